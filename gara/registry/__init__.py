"""MLflow registry: the pyfunc model teams pull, registration, and champion promotion."""

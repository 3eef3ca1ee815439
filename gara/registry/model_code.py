"""Models-from-code entry point: MLflow runs this file to build the model (nothing is pickled).

It is copied into every registered version; the logic lives in the installed ``gara`` package.
"""

from mlflow.models import set_model

from gara.registry.model import GaraSamModel

set_model(GaraSamModel())

"""Models-from-code entry point: MLflow runs this file to build the model (nothing is pickled).

It is copied into every registered version; the logic lives in the ``gara`` sources the version
carries (``code/gara``, put on ``sys.path`` by MLflow at load).
"""

from mlflow.models import set_model

from gara.registry.model import GaraSamModel

set_model(GaraSamModel())

"""Models-from-code entry point: MLflow runs this file to build the model (nothing is pickled).

It is copied into every registered version beside ``code/gara.zip``, the ``gara`` sources the
version was registered with; putting that zip first on ``sys.path`` makes the version run its
own code, whether or not (and whichever version of) ``gara`` is installed where it is loaded.
"""

import sys
from pathlib import Path

from mlflow.models import set_model

_bundle = Path(__file__).resolve().parent / "code" / "gara.zip"
if _bundle.is_file() and str(_bundle) not in sys.path:  # absent when run from the source tree
    sys.path.insert(0, str(_bundle))

from gara.registry.model import GaraSamModel  # noqa: E402  (after the bundle is importable)

set_model(GaraSamModel())

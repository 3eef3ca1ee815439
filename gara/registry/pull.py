"""Load a registered model the way downstream teams do: ``mlflow.pyfunc.load_model``.

``gara predict`` and ``gara demo`` both run what a puller runs (the version's own code bundle,
its adapter, its base checked against the recorded sha256), not this checkout's objects.
"""

from __future__ import annotations

from gara.config import Params
from gara.registry.store import CHAMPION, registry_uri


def champion_uri(params: Params) -> str:
    return f"models:/{params.registry.name}@{CHAMPION}"


def load_pyfunc(params: Params, uri: str | None = None):
    """The pyfunc at ``uri`` (default: the registry's champion), from the params' store.

    A version, alias or folder that cannot be loaded is a ValueError naming the URI and the store
    (credentials redacted), so every command reports it in one line."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from gara.tracking import active_store, redact_uri

    uri = uri or champion_uri(params)
    store = registry_uri(params)
    with active_store(store):
        try:
            return mlflow.pyfunc.load_model(uri)
        except MlflowException as exc:
            raise ValueError(f"{uri}: cannot load it from {redact_uri(store)}: {exc.message}") from None

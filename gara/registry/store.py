"""The MLflow store the registry commands talk to: one URI rule, one client, one lock.

The tracking store doubles as the model registry (MLflow's default). Its URI is
``MLFLOW_TRACKING_URI`` when set, else ``train.mlflow.tracking_uri`` from params.yaml with a
relative ``sqlite:///`` path taken from the current directory: run from the repository root
with no configuration, every command finds the ``mlflow.db`` that ``make run`` wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

from gara.config import Params
from gara.models.checkpoints import cache_dir
from gara.tracking import CHALLENGER, CHAMPION, SQLITE_PREFIX, require_reachable, resolve_tracking_uri

__all__ = ["CHALLENGER", "CHAMPION", "client_for", "lock_path", "promotion_lock", "registry_uri"]


def registry_uri(params: Params) -> str:
    uri = resolve_tracking_uri(params.train.mlflow.tracking_uri)
    assert uri is not None  # the params default is never empty
    return uri


def client_for(uri: str):
    """A client of ``uri``'s store; an unreachable server fails here, in seconds."""
    from mlflow import MlflowClient

    require_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def lock_path(uri: str, name: str) -> Path:
    """Beside a SQLite store (every process using that file shares it); for a server, in the
    local cache, which serialises promotions from this host (the Prefect flow adds a
    cluster-wide concurrency limit on top)."""
    if uri.startswith(SQLITE_PREFIX):
        db = Path(uri[len(SQLITE_PREFIX):])
        return db.with_name(f"{db.name}.{name}.promote.lock")
    tag = hashlib.sha256(f"{uri}|{name}".encode()).hexdigest()[:16]
    return cache_dir() / "locks" / f"promote-{tag}.lock"


@contextlib.contextmanager
def promotion_lock(uri: str, name: str) -> Iterator[None]:
    """Exclusive: read champion, decide, move the alias, as one step."""
    path = lock_path(uri, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

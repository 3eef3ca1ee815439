"""MLflow tracking: one place that resolves, absolutises and redacts store URIs, and names
nested values as flat MLflow keys."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SQLITE_PREFIX = "sqlite:///"
# The sha256 of an adapter's weights, on the run that trained them and on every version made
# from them: how a folder finds its run and its version in any store.
ADAPTER_WEIGHTS_TAG = "gara.adapter_weights_sha256"
# The registry's aliases: the version serving pulls, and the newest version awaiting the gate.
CHAMPION = "champion"
CHALLENGER = "challenger"
# An MLflow server must answer within this: MLflow's client retries a refused connection for
# minutes (then prints chained tracebacks) before anything is logged.
REACHABLE_TIMEOUT_S = 5.0


class TrackingServerUnreachable(ConnectionError):
    """The tracking server named by the URI did not answer (a user error: one line, exit 2)."""


def flatten_tree(tree: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params and
    metrics are flat)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_tree(value, sep, f"{name}{sep}"))
        else:
            flat[name] = value
    return flat


def absolute_tracking_uri(uri: str, base: Path) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db`` (Ray workers and DVC's temp copies run
    elsewhere); other URIs unchanged."""
    if uri.startswith(SQLITE_PREFIX) and not uri[len(SQLITE_PREFIX):].startswith("/"):
        return SQLITE_PREFIX + str((base / uri[len(SQLITE_PREFIX):]).resolve())
    return uri


def effective_tracking_uri(configured: str | None) -> str | None:
    """``MLFLOW_TRACKING_URI`` from the environment wins over the params file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


def resolve_tracking_uri(configured: str | None, base: Path | None = None) -> str | None:
    """The URI every command uses: the environment's, else the configured one, with a relative
    ``sqlite:///`` path made absolute against ``base`` (default: the current directory, the
    repository root when run by make / DVC / the Prefect flows)."""
    uri = effective_tracking_uri(configured)
    return absolute_tracking_uri(uri, base or Path.cwd()) if uri else None


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing (with a SQLite store, its artifacts
    go beside the database, not into whatever the current directory is)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith(SQLITE_PREFIX):
        location = (Path(uri[len(SQLITE_PREFIX):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def redact_uri(uri: str | None) -> str:
    """Drop user:password@ from a URI before it is printed or written anywhere."""
    if not uri:
        return "the default tracking URI"
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def require_reachable(uri: str, timeout: float = REACHABLE_TIMEOUT_S) -> None:
    """Fail in seconds, naming the URI, when an http(s) tracking server does not answer.

    Any HTTP answer counts (a 401 from an authenticating proxy is a reachable server); local
    stores (sqlite, file) need no check.
    """
    import urllib.error
    import urllib.request

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    health = urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/health", query="", fragment=""))
    try:
        with urllib.request.urlopen(health, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingServerUnreachable(
            f"MLflow tracking server {redact_uri(uri)} did not answer within {timeout:.0f} s ({reason}); "
            "start it, or set MLFLOW_TRACKING_URI / train.mlflow.tracking_uri to one that runs") from None


@contextlib.contextmanager
def active_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, load_model) at ``uri`` for a block, then restore.

    MLflow's setters also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, so what is
    restored is the environment as it was (unset stays unset), not MLflow's resolved default.
    """
    import mlflow

    require_reachable(uri)
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)

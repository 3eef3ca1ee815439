"""MLflow tracking URIs: one place that resolves, absolutises and redacts them."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

SQLITE_PREFIX = "sqlite:///"


def absolute_tracking_uri(uri: str, base: Path) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db`` (Ray workers and DVC's temp copies run
    elsewhere); other URIs unchanged."""
    if uri.startswith(SQLITE_PREFIX) and not uri[len(SQLITE_PREFIX):].startswith("/"):
        return SQLITE_PREFIX + str((base / uri[len(SQLITE_PREFIX):]).resolve())
    return uri


def effective_tracking_uri(configured: str | None) -> str | None:
    """``MLFLOW_TRACKING_URI`` from the environment wins over the params file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


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

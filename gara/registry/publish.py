"""``gara publish``: the pipeline's registry step. Register the evaluated adapter, then decide
its promotion, unless the tracking store already holds exactly that outcome.

DVC cannot see a tracking store, so the ``publish`` stage runs on every ``dvc repro``
(``always_changed``) and this module makes that cheap and safe:

- **In step** (the common no-op, well under a second): the record ``--out`` written by the
  last publish names the same store, model, adapter weights and evaluation set as now, and
  the store still holds that version (with those weights) and a champion. Checked without
  importing MLflow: a read-only SQL query for a ``sqlite:///`` store, MLflow's REST API for
  a server. Anything the check cannot answer (another store kind, an unexpected schema or
  reply) counts as "not in step".
- **Otherwise** (a new adapter or report, a deleted ``mlflow.db``, a new server named by
  ``MLFLOW_TRACKING_URI``): :func:`gara.registry.register.register` and
  :func:`gara.registry.promote.promote` run, both idempotent, and the record is rewritten
  atomically, only after both succeeded.

The record is a local note for this check and for people (``reports/registry/publish.json``),
not a DVC output: it names a version of one store, which no other checkout shares.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gara.config import Params
from gara.fsutil import atomic_write_json
from gara.models.manifest import read_manifest
from gara.registry.evidence import read_report
from gara.tracking import ADAPTER_WEIGHTS_TAG, CHAMPION, SQLITE_PREFIX, redact_uri, resolve_tracking_uri

DEFAULT_RECORD = Path("reports/registry/publish.json")  # as dvc.yaml's publish stage writes it
PROBE_TIMEOUT_S = 5.0


@dataclass
class Published:
    store: str  # the tracking store, redacted
    name: str
    version: str
    weights_sha256: str
    evaluation_set: str
    candidate: str
    champion: str | None
    promoted: bool
    reason: str
    in_step: bool  # True: nothing was written, the store already held this outcome


def _inputs(params: Params, uri: str, adapter_dir: Path, report_dir: Path) -> dict[str, str]:
    """What a publish is of: the store, the model name, the weights and the evaluation set."""
    metrics = read_report(report_dir)
    return {
        "store": redact_uri(uri),
        "name": params.registry.name,
        "weights_sha256": read_manifest(adapter_dir).weights_sha256,
        "evaluation_set": str(metrics["evaluation_set"]),
        "candidate": params.registry.candidate or str(metrics["primary"]),
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    """The last publish's record, or None when there is none or it is not one (an edited or
    older file): then publishing runs in full and rewrites it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    recorded = {f.name for f in fields(Published)} - {"in_step"}
    return record if isinstance(record, dict) and set(record) == recorded else None


def _sqlite_holds(db: Path, name: str, version: str, sha: str) -> bool:
    """Read-only: version ``version`` of ``name`` carries weights ``sha`` and ``name`` has a champion."""
    if not db.is_file():
        return False
    connection = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=PROBE_TIMEOUT_S)
    try:
        tagged = connection.execute(
            "SELECT value FROM model_version_tags WHERE name = ? AND version = ? AND key = ?",
            (name, int(version), ADAPTER_WEIGHTS_TAG)).fetchone()
        champion = connection.execute(
            "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
            (name, CHAMPION)).fetchone()
    finally:
        connection.close()
    return tagged is not None and tagged[0] == sha and champion is not None


def _rest(uri: str, endpoint: str, query: dict[str, str]) -> dict[str, Any]:
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    request = urllib.request.Request(url)
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    elif user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
        return json.loads(response.read())


def _server_holds(uri: str, name: str, version: str, sha: str) -> bool:
    found = _rest(uri, "model-versions/get", {"name": name, "version": version})["model_version"]
    tags = {t["key"]: t.get("value") for t in found.get("tags", [])}
    _rest(uri, "registered-models/alias", {"name": name, "alias": CHAMPION})  # 404 (raises) if none
    return tags.get(ADAPTER_WEIGHTS_TAG) == sha


def store_holds(uri: str, name: str, version: str, sha: str) -> bool:
    """Whether the store at ``uri`` holds version ``version`` of ``name`` made from weights ``sha``,
    and a champion. False whenever it cannot tell (then publishing runs in full)."""
    try:
        if uri.startswith(SQLITE_PREFIX):
            return _sqlite_holds(Path(uri[len(SQLITE_PREFIX):]), name, version, sha)
        if uri.startswith(("http://", "https://")):
            return _server_holds(uri, name, version, sha)
    except (OSError, ValueError, KeyError, TypeError, sqlite3.Error):
        return False
    return False


def publish(params: Params, adapter_dir: str | Path, report_dir: str | Path, record: str | Path) -> Published:
    """Register + promote the adapter in ``adapter_dir`` scored by ``report_dir`` unless the store
    is in step with ``record``; the record is rewritten after a full publish."""
    adapter_dir, report_dir, record = Path(adapter_dir), Path(report_dir), Path(record)
    uri = resolve_tracking_uri(params.train.mlflow.tracking_uri)
    assert uri is not None  # the params default is never empty
    inputs = _inputs(params, uri, adapter_dir, report_dir)
    previous = _read_record(record)
    if (previous is not None and all(previous.get(k) == v for k, v in inputs.items())
            and store_holds(uri, inputs["name"], str(previous.get("version")), inputs["weights_sha256"])):
        return Published(**{**previous, "in_step": True})

    from gara.registry.promote import evaluation_rescorer, promote
    from gara.registry.register import register

    registered = register(params, adapter_dir, report_dir, inputs["candidate"])
    decision = promote(params, registered.version, evaluation_rescorer(params))
    result = Published(**inputs, version=registered.version, champion=decision.champion,
                       promoted=decision.promoted, reason=decision.reason, in_step=False)
    atomic_write_json(record, {k: v for k, v in asdict(result).items() if k != "in_step"})
    return result

"""Lineage of a training run: code version, data version, base weights, corruption set.

These become tags of the MLflow run, so any adapter can be traced back to what made it.

``dvc_data_hash`` (first that applies):
  1. ``dvc.lock`` at the project root: the ``md5`` of the stage output whose path is the
     training data folder (e.g. ``artifacts/corrupted/train``, written by ``dvc repro``);
  2. a ``*.dvc`` file at the project root whose tracked folder contains the training data
     (``data.dvc`` -> ``data``): that folder's md5 (the raw data version it came from);
  3. ``sha256:<hex>`` of the data folder's ``annotations.json`` (data outside DVC).
``dvc_data_hash_source`` says which one was used.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import yaml

from gara.data.coco import annotations_path, read_coco


def project_root(start: str | Path | None = None) -> Path:
    """The git top level of ``start`` (default: cwd), or ``start`` itself outside git."""
    start = Path(start or Path.cwd()).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=start, capture_output=True,
                             text=True, timeout=10, check=True)
        return Path(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return start


def git_commit(root: str | Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _relative(path: Path, root: Path) -> Path | None:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _outs(doc: Any) -> list[dict[str, Any]]:
    return [o for o in (doc or {}).get("outs") or [] if isinstance(o, dict) and o.get("path")]


def dvc_data_hash(data: str | Path, root: str | Path) -> tuple[str, str]:
    """(hash, source) for the training data folder; see the module docstring for the order."""
    data, root = Path(data), Path(root)
    rel = _relative(data, root)
    if rel is not None:
        lock = _read_yaml(root / "dvc.lock")
        for stage in ((lock or {}).get("stages") or {}).values():
            for out in _outs(stage):
                if Path(out["path"]) == rel and out.get("md5"):
                    return str(out["md5"]), "dvc.lock"
        for dvc_file in sorted(root.glob("*.dvc")):
            for out in _outs(_read_yaml(dvc_file)):
                tracked = Path(out["path"])
                if (rel == tracked or tracked in rel.parents) and out.get("md5"):
                    return str(out["md5"]), dvc_file.name
    digest = hashlib.sha256(annotations_path(data).read_bytes()).hexdigest()
    return f"sha256:{digest}", "annotations.json"


def corruption_set(data: str | Path) -> str:
    """Sorted 'type:severity' pairs present in the data's image entries ('none' if unmarked)."""
    pairs = set()
    for entry in read_coco(data)["images"]:
        if isinstance(entry, dict) and "corruption" in entry:
            pairs.add((str(entry["corruption"]), int(entry.get("severity", 0))))
    return ",".join(f"{t}:{s}" for t, s in sorted(pairs)) or "none"

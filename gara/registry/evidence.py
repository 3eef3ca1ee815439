"""The evaluation a version is registered on: a report folder's ``metrics.json``, read and
checked once (free of MLflow, so ``gara publish`` can read it before deciding whether the
store needs anything)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RegistrationError(ValueError):
    """The adapter, the report or the run do not fit together; the message says which."""


def summary_value(summary: dict[str, Any], path: str, where: str) -> float:
    """``degrade.box.iou`` -> summary["degrade"]["box"]["iou"], refusing a missing value."""
    node: Any = summary
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise RegistrationError(f"{where}: no {path!r} in the summary")
        node = node[key]
    if not isinstance(node, int | float):
        raise RegistrationError(f"{where}: {path} is {node!r}, not a number (was it evaluated?)")
    return float(node)


def read_report(report_dir: Path) -> dict[str, Any]:
    path = report_dir / "metrics.json"
    if not path.is_file():
        raise RegistrationError(
            f"{path}: missing; run gara evaluate first (register takes evaluated runs only)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RegistrationError(f"{path}: not valid JSON: {exc}") from None
    for key in ("models", "primary", "evaluation_set"):
        if key not in metrics:
            raise RegistrationError(f"{path}: no {key!r}; re-run gara evaluate with this version of gara")
    return metrics

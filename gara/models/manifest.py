"""An adapter folder's manifest, ``adapter.json``: what the tensors beside it are for and which
base they belong to. Reading it needs no torch (commands that only look, such as
``gara publish``, stay fast); :mod:`gara.models.adapter_io` writes and loads whole folders.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from gara.models.adapters.config import AdapterConfig

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
FORMAT_VERSION = 1


class AdapterFormatError(ValueError):
    """An adapter folder is incomplete, inconsistent, or does not fit the model."""


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    adapter: AdapterConfig | None  # None: the frozen base, no adapter
    backbone: str
    base_checkpoint: str | None
    base_checkpoint_sha256: str | None
    weights_sha256: str
    adapted_layers: list[str]
    trainable_params: int


def read_manifest(directory: str | Path) -> AdapterManifest:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{path}: missing; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return AdapterManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise AdapterFormatError(f"{path}: not a valid adapter config: {exc}") from exc

"""Typed parameters: params.yaml -> pydantic models -> functions.

One loader; a bad value fails at load time with the file, the dotted key and the value.
Sections this module does not model yet are kept as plain dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gara.models.adapters.config import AdapterConfig

PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A parameter file or override is invalid; the message names the key and the value."""


class ModelConfig(BaseModel):
    """The ``model`` section: which base, where its weights are, which adapter."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "lite_medsam"
    # Path or s3:// URL of the base weights; None = the backbone's packaged weights.
    checkpoint: str | None = None
    checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    s3_endpoint_url: str | None = None
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)


class Params(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: ModelConfig = Field(default_factory=ModelConfig)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: invalid parameters:\n  {lines}") from None


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Read a params file (missing file = all defaults) and apply dotted-key overrides."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return parse_params(raw, str(path))


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[leaf] = value

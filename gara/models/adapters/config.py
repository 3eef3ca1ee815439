"""Adapter configuration: what kind, where it goes, and its sizes."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gara.models.adapters.projections import QKV

AdapterKind = Literal["lora", "gara"]


class AdapterConfig(BaseModel):
    """Typed adapter settings (the ``model.adapter`` section of params.yaml).

    Ranks: LoRA uses ``rank``; GaRA uses ``low_rank`` (r_L) and ``high_rank`` (r_H). Every
    rank is capped at ``rank_cap_fraction`` x the layer's input width. At the default 0.5
    this leaves the paper's 16/256 untouched on ViT-B/L (width 768/1024) and keeps narrow
    TinyViT encoders (LiteMedSAM widths 128/160/320 -> r_H 64/80/160) below full rank.
    """

    model_config = ConfigDict(extra="forbid")

    kind: AdapterKind = "gara"
    # Regular expression searched in module names (as peft's target_modules, but a regex).
    target_modules: str = r"^image_encoder\..*attn\.qkv$"
    # Which of a fused qkv layer's projections get their own low-rank path.
    projections: list[str] = Field(default_factory=lambda: list(QKV))
    rank: int = Field(16, ge=1)
    low_rank: int = Field(16, ge=1)
    high_rank: int = Field(256, ge=1)
    rank_cap_fraction: float | None = Field(0.5, gt=0, le=1)
    space_gate_hidden: int = Field(64, ge=1)
    component_gate_hidden: int = Field(16, ge=1)
    tau: float = Field(0.5, gt=0)
    scale: float = 1.0

    @field_validator("target_modules")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @field_validator("projections")
    @classmethod
    def _valid_projections(cls, value: list[str]) -> list[str]:
        allowed = (*QKV, "out")
        bad = [p for p in value if p not in allowed]
        if bad or not value or len(set(value)) != len(value):
            raise ValueError(f"projections must be distinct names from {allowed}, got {value}")
        return value

    def capped(self, rank: int, in_features: int) -> int:
        if self.rank_cap_fraction is None:
            return rank
        return max(1, min(rank, int(self.rank_cap_fraction * in_features)))

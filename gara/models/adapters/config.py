"""Adapter configuration: what kind, where it goes, and its sizes."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The fused attention projection's parts, in the order they sit in its output (light: no torch,
# so loading params stays fast).
QKV = ("q", "k", "v")

AdapterKind = Literal["lora", "gara", "adaptformer"]

# Where each kind goes when ``target_modules`` is not set. LoRA/GaRA: every attention qkv
# Linear. Adaptformer: every encoder block's MLP (SAM ViT: image_encoder.blocks.N.mlp;
# TinyViT/LiteMedSAM: image_encoder.layers.S.blocks.N.mlp, its conv stage has no MLP;
# SAM 2.1 Hiera: image_encoder.trunk.blocks.N.mlp).
DEFAULT_TARGETS: dict[str, str] = {
    "lora": r"^image_encoder\..*attn\.qkv$",
    "gara": r"^image_encoder\..*attn\.qkv$",
    "adaptformer": r"^image_encoder\.(layers\.\d+\.|trunk\.)?blocks\.\d+\.mlp$",
}


class AdapterConfig(BaseModel):
    """Typed adapter settings (the ``model.adapter`` section of params.yaml).

    Ranks: LoRA and Adaptformer use ``rank``; GaRA uses ``low_rank`` (r_L) and ``high_rank``
    (r_H). Every rank is capped at ``rank_cap_fraction`` x the layer's input width. At the
    default 0.5 this leaves the paper's 16/256 untouched on ViT-B/L (width 768/1024) and keeps
    narrow TinyViT encoders (LiteMedSAM widths 128/160/320 -> r_H 64/80/160) below full rank.

    ``cobot: true`` adds SAM-COBOT's cross-block orchestration to any kind (cobot.py); its
    quaternion head needs every rank divisible by 4 (capped ranks are rounded down to one).
    """

    model_config = ConfigDict(extra="forbid")

    kind: AdapterKind = "gara"
    # Regular expression searched in module names (as peft's target_modules, but a regex).
    # None = the kind's default (DEFAULT_TARGETS); the validated config holds the regex used.
    target_modules: str | None = None
    # Which of a fused qkv layer's projections get their own low-rank path (LoRA, GaRA).
    projections: list[str] = Field(default_factory=lambda: list(QKV))
    cobot: bool = False
    rank: int = Field(16, ge=1)
    low_rank: int = Field(16, ge=1)
    high_rank: int = Field(256, ge=1)
    rank_cap_fraction: float | None = Field(0.5, gt=0, le=1)
    space_gate_hidden: int = Field(64, ge=1)
    component_gate_hidden: int = Field(16, ge=1)
    tau: float = Field(0.5, gt=0)
    # Initial bias of GaRA's component-gate logits. null (our reading; the paper is silent):
    # PyTorch's default Linear init, small random logits, so at the start a component is on in
    # ~63% of training steps (Gumbel noise decides) and, at evaluation, wherever its initial
    # logit is positive. A number sets every component gate's output bias to it: 3 starts every
    # component on (GaRA begins as a LoRA of the chosen space) and lets the gates learn to
    # switch components off.
    gate_bias: float | None = None
    # Initial gamma of every COBOT unit: 1 = the authors' released code, u = (c + gamma) A x =
    # 2 A x at the start (twice plain LoRA's update); 0 = start at plain LoRA's scale.
    cobot_gamma: float = 1.0
    dropout: float = Field(0.1, ge=0, lt=1)  # Adaptformer's bottleneck dropout (AdaptFormer: 0.1)
    scale: float = 1.0

    @field_validator("target_modules")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is None:
            return None
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

    @model_validator(mode="after")
    def _resolve(self) -> AdapterConfig:
        if self.target_modules is None:
            self.target_modules = DEFAULT_TARGETS[self.kind]
        if self.cobot:
            names = ("low_rank", "high_rank") if self.kind == "gara" else ("rank",)
            bad = [f"{n}={getattr(self, n)}" for n in names if getattr(self, n) % 4]
            if bad:
                raise ValueError(
                    f"cobot: true needs ranks divisible by 4 (quaternion head), got {', '.join(bad)}"
                )
        return self

    def capped(self, rank: int, in_features: int) -> int:
        if self.rank_cap_fraction is None:
            return rank
        capped = min(rank, int(self.rank_cap_fraction * in_features))
        if self.cobot:  # keep the quaternion head's multiple of 4
            return max(4, capped - capped % 4)
        return max(1, capped)

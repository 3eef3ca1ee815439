"""Which output channels of a fused projection belong to Q, K and V.

segment-anything's ViT packs q|k|v as three contiguous thirds of ``attn.qkv``. TinyViT
(LiteMedSAM, MobileSAM) interleaves them per head: for each head h, ``[q_h | k_h | v_h]``
with widths key_dim, key_dim, d. Both are one pattern: the output viewed as
(heads, period), a part taking ``width`` channels at ``offset`` in every head. Adapters keep
separate Q/K/V paths and add each path's update through that strided view (no index
scatter, which cost as much as the frozen projection itself on CPU). Any other Linear is a
single part named ``out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gara.models.adapters.config import QKV


@dataclass(frozen=True)
class PartSlice:
    """Channels ``h * period + offset + i`` for h < heads, i < width (head-major order)."""

    heads: int
    period: int
    offset: int
    width: int

    def __len__(self) -> int:
        return self.heads * self.width


@dataclass(frozen=True)
class ProjectionLayout:
    """Named groups of a Linear's output channels."""

    out_features: int
    parts: dict[str, PartSlice]

    def size(self, part: str) -> int:
        return len(self.parts[part])

    def select(self, names: Sequence[str]) -> ProjectionLayout:
        unknown = [n for n in names if n not in self.parts]
        if unknown:
            raise ValueError(f"projection(s) {unknown} not in this layer; it has {sorted(self.parts)}")
        return ProjectionLayout(self.out_features, {n: self.parts[n] for n in names})

    def add_into(self, out: torch.Tensor, part: str, delta: torch.Tensor) -> None:
        """out[..., channels(part)] += delta, in place through a strided view (autograd-safe)."""
        s = self.parts[part]
        view = out.unflatten(-1, (s.heads, s.period))[..., s.offset : s.offset + s.width]
        view.add_(delta.unflatten(-1, (s.heads, s.width)))


def layout_for(linear: nn.Linear, parent: nn.Module | None) -> ProjectionLayout:
    """Work out the Q/K/V layout of ``linear`` from the attention module that owns it."""
    out = linear.out_features
    if parent is None or getattr(parent, "qkv", None) is not linear:
        return ProjectionLayout(out, {"out": PartSlice(1, out, 0, out)})
    if all(hasattr(parent, a) for a in ("key_dim", "d", "num_heads")):  # TinyViT attention
        kd, d, heads = parent.key_dim, parent.d, parent.num_heads
        period = 2 * kd + d
        if period * heads != out:
            raise ValueError(f"TinyViT qkv: {heads} heads x {period} != {out} outputs")
        parts = {"q": PartSlice(heads, period, 0, kd), "k": PartSlice(heads, period, kd, kd),
                 "v": PartSlice(heads, period, 2 * kd, d)}
        return ProjectionLayout(out, parts)
    if out % 3:
        raise ValueError(f"qkv layer with {out} outputs cannot be split into equal q, k, v")
    third = out // 3
    return ProjectionLayout(out, {p: PartSlice(1, out, i * third, third) for i, p in enumerate(QKV)})

"""Which output channels of a fused projection belong to Q, K and V.

segment-anything's ViT packs q|k|v as three contiguous thirds of ``attn.qkv``. TinyViT
(LiteMedSAM, MobileSAM) interleaves them per head: for each head h, ``[q_h | k_h | v_h]``
with widths key_dim, key_dim, d. Adapters keep separate Q/K/V paths, so they need the
output channels of each part; any other Linear is a single part named ``out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class ProjectionLayout:
    """Named groups of output channels: a ``range`` when contiguous, else an index tuple."""

    out_features: int
    parts: dict[str, range | tuple[int, ...]]

    def size(self, part: str) -> int:
        return len(self.parts[part])

    def select(self, names: Sequence[str]) -> ProjectionLayout:
        unknown = [n for n in names if n not in self.parts]
        if unknown:
            raise ValueError(f"projection(s) {unknown} not in this layer; it has {sorted(self.parts)}")
        return ProjectionLayout(self.out_features, {n: self.parts[n] for n in names})

    def index(self, part: str, device: torch.device) -> torch.Tensor | None:
        """Index tensor for a non-contiguous part (None for a contiguous one)."""
        spec = self.parts[part]
        return None if isinstance(spec, range) else torch.as_tensor(spec, device=device)

    def add_into(self, out: torch.Tensor, part: str, delta: torch.Tensor,
                 index: torch.Tensor | None = None) -> None:
        """out[..., channels(part)] += delta, in place (autograd-safe)."""
        spec = self.parts[part]
        if isinstance(spec, range):
            out.narrow(-1, spec.start, len(spec)).add_(delta)
        else:
            if index is None:
                index = torch.as_tensor(spec, device=out.device)
            out.index_add_(out.ndim - 1, index, delta)


def layout_for(linear: nn.Linear, parent: nn.Module | None) -> ProjectionLayout:
    """Work out the Q/K/V layout of ``linear`` from the attention module that owns it."""
    out = linear.out_features
    if parent is None or getattr(parent, "qkv", None) is not linear:
        return ProjectionLayout(out, {"out": range(out)})
    if all(hasattr(parent, a) for a in ("key_dim", "d", "num_heads")):  # TinyViT attention
        kd, d, heads = parent.key_dim, parent.d, parent.num_heads
        per_head = 2 * kd + d
        if per_head * heads != out:
            raise ValueError(f"TinyViT qkv: {heads} heads x {per_head} != {out} outputs")
        q = tuple(h * per_head + i for h in range(heads) for i in range(kd))
        k = tuple(h * per_head + kd + i for h in range(heads) for i in range(kd))
        v = tuple(h * per_head + 2 * kd + i for h in range(heads) for i in range(d))
        return ProjectionLayout(out, {"q": q, "k": k, "v": v})
    if out % 3:
        raise ValueError(f"qkv layer with {out} outputs cannot be split into equal q, k, v")
    third = out // 3
    return ProjectionLayout(
        out, {"q": range(0, third), "k": range(third, 2 * third), "v": range(2 * third, out)}
    )

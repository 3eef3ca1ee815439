"""LoRA: a fixed-rank update on chosen projections of a frozen Linear."""

from __future__ import annotations

import torch
from torch import nn

from gara.models.adapters.lowrank import LowRankAdapterLinear, as_tokens
from gara.models.adapters.projections import ProjectionLayout


class LoRALinear(LowRankAdapterLinear):
    """h = W0 x + scale * B A x, with separate (A, B) per adapted projection.

    With ``cobot=True`` every adapted projection is one COBOT unit: h = W0 x + scale * B h_l,
    h_l = W_h^T ((c_l + gamma_l) * A x) (see cobot.py).
    """

    adapter_kind = "lora"

    def __init__(
        self, base: nn.Linear, layout: ProjectionLayout, rank: int, scale: float = 1.0, cobot: bool = False
    ):
        super().__init__(base, layout, rank, scale, cobot_spaces=(rank,) if cobot else None)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        self._add_low_rank(as_tokens(out), as_tokens(x), coeff=None)
        return out

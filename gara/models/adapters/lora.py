"""LoRA: a fixed-rank update on chosen projections of a frozen Linear."""

from __future__ import annotations

import torch

from gara.models.adapters.lowrank import LowRankAdapterLinear, as_tokens


class LoRALinear(LowRankAdapterLinear):
    """h = W0 x + scale * B A x, with separate (A, B) per adapted projection."""

    adapter_kind = "lora"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        self._add_low_rank(as_tokens(out), as_tokens(x), coeff=None)
        return out

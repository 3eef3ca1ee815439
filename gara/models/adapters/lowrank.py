"""The shared core of LoRA and GaRA: rank-1 components on chosen parts of a frozen Linear.

For each adapted part p (q, k, v, or the whole output) the update is
``delta_p(x) = scale * B_p diag(c) A_p x`` with A_p (R, in) and B_p (out_p, R). LoRA uses
c = 1; GaRA computes c per input from its gates. All parts' A are kept in one tensor so
the down-projection of every path is a single matmul.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gara.models.adapters.projections import ProjectionLayout


class LowRankAdapterLinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; subclasses decide the per-input coefficients."""

    adapter_kind = "lowrank"

    def __init__(self, base: nn.Linear, layout: ProjectionLayout, rank: int, scale: float = 1.0):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.layout = layout
        self.part_names = tuple(layout.parts)
        self.rank = rank
        self.scale = scale
        in_features = base.in_features
        # Init as peft/nn.Linear: A Kaiming-uniform, B zero, so the adapted layer starts
        # exactly at the frozen one.
        a = torch.empty(len(self.part_names), rank, in_features)
        for i in range(len(self.part_names)):
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.ParameterDict(
            {p: nn.Parameter(torch.zeros(layout.size(p), rank)) for p in self.part_names}
        )

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some modules read .weight of their projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _add_low_rank(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        coeff: torch.Tensor | None,
        components: torch.Tensor | None = None,
    ) -> None:
        """out += delta(x), in place.

        x: (N, T, in), out: (N, T, out). coeff: (N, R') per-input weights of the components
        (None = all ones). components: indices of the R' components to compute (None = all).
        """
        n, t, _ = x.shape
        n_parts = len(self.part_names)
        a = self.lora_A if components is None else self.lora_A.index_select(1, components)
        r = a.shape[1]
        z = (x @ a.reshape(n_parts * r, -1).T).view(n, t, n_parts, r)
        if coeff is None:
            z = z * self.scale if self.scale != 1.0 else z
        else:
            z = z * (coeff * self.scale)[:, None, None, :]
        for i, part in enumerate(self.part_names):
            b = self.lora_B[part]
            if components is not None:
                b = b.index_select(1, components)
            self.layout.add_into(out, part, z[:, :, i] @ b.T)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """This layer's own trainable tensors (not the frozen base)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    def extra_repr(self) -> str:
        return f"parts={self.part_names}, rank={self.rank}, scale={self.scale}"


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """View any (N, ..., C) activation as (N, T, C): one row per attention input."""
    if x.ndim == 2:
        return x[:, None]
    return x.reshape(x.shape[0], -1, x.shape[-1])

"""The shared core of LoRA and GaRA: rank-1 components on chosen parts of a frozen Linear.

For each adapted part p (q, k, v, or the whole output) the update is
``delta_p(x) = scale * B_p diag(c) A_p x`` with A_p (R, in) and B_p (out_p, R). LoRA uses
c = 1; GaRA computes c per input from its gates. All parts' A are kept in one tensor so
the down-projection of every path is a single matmul. With COBOT (cobot.py) the forward uses
folded factors A' = diag(c_l + gamma_l) A and B'_p = B_p W_h^T instead of A and B_p.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gara.models.adapters.cobot import CobotUnits
from gara.models.adapters.layer import AdapterLayer
from gara.models.adapters.projections import ProjectionLayout


class LowRankAdapterLinear(AdapterLayer):
    """Wraps a frozen ``nn.Linear``; subclasses decide the per-input coefficients.

    ``cobot_spaces``: the rank spaces that become COBOT units for every part (LoRA: (rank,),
    GaRA: (r_L, r_H)); None = no COBOT.
    """

    adapter_kind = "lowrank"

    def __init__(
        self,
        base: nn.Linear,
        layout: ProjectionLayout,
        rank: int,
        scale: float = 1.0,
        cobot_spaces: tuple[int, ...] | None = None,
    ):
        super().__init__(base)
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
        if cobot_spaces is not None:
            if sum(cobot_spaces) != rank:
                raise ValueError(f"COBOT spaces {cobot_spaces} do not add up to rank {rank}")
            self.cobot = CobotUnits(len(self.part_names), cobot_spaces)

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

    def factors(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(A (parts, R, in), [B_p (out_p, R)]) as the forward uses them.

        With COBOT, u = g * (c_l + gamma_l) * A x and delta = B W_h^T u: both element-wise
        factors commute with the per-input gates g, so COBOT folds into the weights once per
        forward (cheaper than mixing every token's bottleneck when tokens outnumber outputs).
        """
        a, up = self.lora_A, [self.lora_B[p] for p in self.part_names]
        if self.cobot is not None:
            a = a * self.cobot.scales()[:, :, None]
            up = self.cobot.fold_into_up(up)
        return a, up

    def _add_low_rank(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        coeff: torch.Tensor | None,
        components: torch.Tensor | None = None,
        factors: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    ) -> None:
        """out += delta(x), in place.

        x: (N, T, in), out: (N, T, out). coeff: (N, R') per-input weights of the components
        (None = all ones). components: indices of the R' components to compute (None = all).
        factors: ``self.factors()`` when the caller already has them.
        """
        n, t, _ = x.shape
        n_parts = len(self.part_names)
        a, up = factors if factors is not None else self.factors()
        a = a if components is None else a.index_select(1, components)
        r = a.shape[1]
        z = (x @ a.reshape(n_parts * r, -1).T).view(n, t, n_parts, r)
        if coeff is None:
            z = z * self.scale if self.scale != 1.0 else z
        else:
            z = z * (coeff * self.scale)[:, None, None, :]
        for i, (part, b) in enumerate(zip(self.part_names, up, strict=True)):
            if components is not None:
                b = b.index_select(1, components)
            self.layout.add_into(out, part, z[:, :, i] @ b.T)

    def extra_repr(self) -> str:
        return f"parts={self.part_names}, rank={self.rank}, scale={self.scale}"


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """View any (N, ..., C) activation as (N, T, C): one row per attention input."""
    if x.ndim == 2:
        return x[:, None]
    return x.reshape(x.shape[0], -1, x.shape[-1])

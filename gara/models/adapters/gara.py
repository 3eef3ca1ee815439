"""GaRA: gated-rank adaptation (Lee et al., GaRA-SAM, NeurIPS 2025).

Per adapted layer: a low rank space (r_L components) and a high one (r_H components), each
a sum of rank-1 terms b_i a_i^T on every adapted projection (Q, K, V separately, sharing
one set of gates). Per attention input (a window, or a whole image in global blocks):

    g        = mean of the input tokens                       (gate input, our reading)
    z_space  = GumbelSigmoid(space_gate(g))                   2-layer MLP, hidden 64
    z_L, z_H = GumbelSigmoid(low_gate(g)), (high_gate(g))     3-layer MLPs, hidden 16
    dW(x)    = (1 - z_space) sum_i z_L,i b_i a_i^T + z_space sum_j z_H,j b_j a_j^T

On SAM 2.1's Hiera the blocks that open a stage widen the tokens (dim -> dim_out = 2 dim) and
pool the queries: their qkv maps dim -> 3 dim_out. There the gate input is the same rule, the
mean of what qkv reads: the normalised block input, width dim, over one window (or the whole
map in global blocks), before any pooling; each component's a_i has width dim and b_i width
dim_out per projection. Ranks are capped by the input width dim (AdapterConfig.capped).

The components are stored as one rank-(r_L + r_H) LoRA (columns 0..r_L-1 = low space), so
a gate decision is just a per-input coefficient c = [(1 - z_space) z_L, z_space z_H].
Training computes every component (the space gate's straight-through gradient needs the
branch not taken); evaluation computes, per group of inputs that chose the same space,
only the components switched on in that group.

With ``cobot=True`` each rank space of each projection is one COBOT unit and the gates act
before the quaternion head: dW(x) = B W_h^T (c * (c_l + gamma_l) * A x), W_h block-diagonal
over the two spaces. Why, and why evaluation stays exact: see cobot.py.
"""

from __future__ import annotations

import torch
from torch import nn

from gara.models.adapters.gates import GateMLP, gumbel_sigmoid
from gara.models.adapters.lowrank import LowRankAdapterLinear, as_tokens
from gara.models.adapters.projections import ProjectionLayout


class GaRALinear(LowRankAdapterLinear):
    adapter_kind = "gara"

    def __init__(
        self,
        base: nn.Linear,
        layout: ProjectionLayout,
        low_rank: int = 16,
        high_rank: int = 256,
        space_gate_hidden: int = 64,
        component_gate_hidden: int = 16,
        tau: float = 0.5,
        scale: float = 1.0,
        cobot: bool = False,
        gate_bias: float | None = None,
    ):
        spaces = (low_rank, high_rank) if cobot else None
        super().__init__(base, layout, rank=low_rank + high_rank, scale=scale, cobot_spaces=spaces)
        self.low_rank, self.high_rank, self.tau = low_rank, high_rank, tau
        c = base.in_features
        self.space_gate = GateMLP(c, space_gate_hidden, 1, n_layers=2)
        self.low_gate = GateMLP(c, component_gate_hidden, low_rank, n_layers=3)
        self.high_gate = GateMLP(c, component_gate_hidden, high_rank, n_layers=3)
        if gate_bias is not None:  # AdapterConfig.gate_bias: where component logits start
            with torch.no_grad():
                for gate in (self.low_gate, self.high_gate):
                    gate[-1].bias.fill_(gate_bias)
        # Decisions of the last forward, per attention input (detached): observability of
        # the method's signature, the effective rank.
        self.last_space: torch.Tensor | None = None
        self.last_active: torch.Tensor | None = None

    @property
    def ranks(self) -> list[int]:
        return [self.low_rank, self.high_rank]

    def gate_coefficients(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled (N, C) -> (coefficients (N, r_L + r_H), space decision (N,))."""
        z_space = gumbel_sigmoid(self.space_gate(pooled), self.tau, self.training)
        z_low = gumbel_sigmoid(self.low_gate(pooled), self.tau, self.training)
        z_high = gumbel_sigmoid(self.high_gate(pooled), self.tau, self.training)
        coeff = torch.cat([(1 - z_space) * z_low, z_space * z_high], dim=-1)
        return coeff, z_space[:, 0]

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        tokens, out_tokens = as_tokens(x), as_tokens(out)
        coeff, space = self.gate_coefficients(tokens.mean(dim=1))
        self.last_space = space.detach()
        self.last_active = (coeff.detach() != 0).sum(dim=-1)
        if self.training:
            self._add_low_rank(out_tokens, tokens, coeff)
        else:
            self._add_selected(out_tokens, tokens, coeff, space)
        return out

    def _add_selected(
        self, out: torch.Tensor, x: torch.Tensor, coeff: torch.Tensor, space: torch.Tensor
    ) -> None:
        """Evaluation: per space, compute only the components active for those inputs.

        Exact with COBOT too: COBOT is folded into A' and B' (``factors``), where component i
        is still row i of A' and column i of B', so leaving out an inactive one drops a zero."""
        factors = self.factors()
        high = space > 0.5
        groups = [None] if bool(high.all()) or not bool(high.any()) else [~high, high]
        for rows in groups:
            c = coeff if rows is None else coeff[rows]
            components = c.any(dim=0).nonzero()[:, 0]
            if len(components) == 0:
                continue
            c = c.index_select(1, components)
            if rows is None:
                self._add_low_rank(out, x, c, components, factors)
            else:
                sub = out[rows]
                self._add_low_rank(sub, x[rows], c, components, factors)
                out[rows] = sub


def effective_ranks(model: nn.Module, batch_size: int) -> dict[str, torch.Tensor]:
    """Active components per image (mean over its attention inputs), per GaRA layer.

    Call after a forward of ``batch_size`` images; returns {layer name: (batch_size,)}. A layer
    switched off (``adapter_enabled``) ran only its base and keeps a stale ``last_active``.
    """
    ranks = {}
    for name, module in model.named_modules():
        if isinstance(module, GaRALinear) and module.adapter_enabled and module.last_active is not None:
            active = module.last_active.float()
            if active.numel() % batch_size:
                raise ValueError(
                    f"{name}: {active.numel()} gate decisions do not split over {batch_size} images"
                )
            ranks[name] = active.view(batch_size, -1).mean(dim=1)
    return ranks

"""GaRA's gates: small MLPs on a pooled token, binarised with a Gumbel-sigmoid."""

from __future__ import annotations

import torch
from torch import nn


class GateMLP(nn.Sequential):
    """Linear-ReLU stack: ``in -> hidden (x n_hidden) -> out`` logits."""

    def __init__(self, in_features: int, hidden: int, out_features: int, n_layers: int):
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(n_layers - 1):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


def gumbel_sigmoid(logits: torch.Tensor, tau: float, training: bool) -> torch.Tensor:
    """Hard 0/1 gates.

    Training: z_soft = sigmoid((logit + g) / tau), g ~ Gumbel(0, 1); the forward value is
    1[z_soft > 0.5] and the gradient is z_soft's (straight-through).
    Evaluation: no noise, 1[sigmoid(logit) > 0.5] = 1[logit > 0], deterministic.
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    # Gumbel(0, 1) = -log(E) with E ~ Exp(1); exponential_ never returns 0.
    gumbel = -torch.empty_like(logits).exponential_().log()
    soft = torch.sigmoid((logits + gumbel) / tau)
    return _StraightThrough.apply(soft)


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly 1[soft > 0.5]; backward: the gradient of soft, unchanged.

    (``hard + soft - soft.detach()`` would leave rounding residue such as 0.99999994.)
    """

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad

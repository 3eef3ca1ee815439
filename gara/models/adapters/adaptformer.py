"""Adaptformer (Chen et al., NeurIPS 2022): a parallel bottleneck adapter on a block's MLP.

    mlp'(x) = mlp(x) + scale * up(Dropout(ReLU(down(x))))          down: C -> r, up: r -> C

The adapter reads the wrapped module's input: in SAM's ViT blocks that is the normalised
hidden state (``mlp(norm2(x))``, as AdaptFormer's "in" layer-norm option); TinyViT's Mlp
normalises inside, so there it is the block's hidden state itself. Init as AdaptFormer's
code: down Kaiming-uniform, its bias and the whole up-projection zero, so the adapted model
starts exactly at the frozen one. With ``cobot=True`` the layer is one COBOT unit:
delta = scale * up(Dropout(ReLU(h))), h = ((c_l + gamma_l) * down(x)) W_h (cobot.py); the
ReLU sits between head and up-projection, so the head runs on tokens instead of folding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gara.models.adapters.cobot import CobotUnits
from gara.models.adapters.layer import AdapterLayer


def io_features(module: nn.Module) -> tuple[int, int]:
    """Input and output width of a Linear, or of an MLP-like module: its first Linear's
    in_features and its last Linear's out_features."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no Linear layer to read its width from")
    return linears[0].in_features, linears[-1].out_features


class AdaptformerLayer(AdapterLayer):
    adapter_kind = "adaptformer"

    def __init__(
        self,
        base: nn.Module,
        rank: int = 16,
        dropout: float = 0.1,
        scale: float = 1.0,
        cobot: bool = False,
    ):
        super().__init__(base)
        self.in_features, self.out_features = io_features(base)
        self.rank, self.scale = rank, scale
        self.down = nn.Linear(self.in_features, rank)
        self.up = nn.Linear(rank, self.out_features)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)
        if cobot:
            self.cobot = CobotUnits(parts=1, spaces=(rank,))

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        z = self.down(x)
        if self.cobot is not None:
            z = self.cobot(z.unsqueeze(-2)).squeeze(-2)  # one unit: parts axis of size 1
        return out + self.scale * self.up(self.dropout(torch.relu(z)))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale}"

"""COBOT: cross-block orchestration of PEFT units (Peng et al., SAM-COBOT, CVPR 2024).

A plug-in for any bottleneck adapter (LoRA, Adaptformer, GaRA). A *unit* is one PEFT path
with an r-dimensional bottleneck z = A x: for LoRA on a fused qkv each adapted projection
(q, v, ...) is a unit; for Adaptformer each MLP adapter; for GaRA each rank space of each
projection (see below). With L units in the encoder:

    inter-block communication  u_l = ((C P)[:, l] + gamma_l) * z      C (r, L), P (L, L) shared
    intra-block enhancement    h_l = u_l W_h,  W_h = sum_m H_m (x) Q_m  (quaternion layer)
    up-projection              LoRA: delta = B h;  Adaptformer: delta = B Dropout(ReLU(h))

W_h's block form is [[R, I, J, K], [-I, R, K, -J], [-J, -K, R, I], [-K, J, -I, R]] with
learned (r/4) x (r/4) blocks R, I, J, K; the H_m are the fixed Hamilton sign matrices.

Initialisation: C = 1, P = I, gamma = 1 (the method's: the authors' released code adds the
identity path to C P, so u = 2 z at the start, twice plain LoRA's update; AdapterConfig.
cobot_gamma = 0 starts at u = z instead); R = I and
I = J = K = 0 (ours: the method is silent), so W_h = I, a perfectly conditioned head that
passes u through unchanged. With the up-projection B at zero the adapted model therefore
starts exactly at the frozen one, as without COBOT.

Units of different rank (GaRA's two spaces; ranks capped per layer on narrow encoders)
share one C with r_max rows: a unit of rank r reads the first r rows of its column of C P.

GaRA (our reading; the paper has no GaRA): each rank space of each projection is a unit
(ViT-B, q/k/v: 12 x 3 x 2 = 72 units), so the head mixes components within a space, never
across the low/high split that the space gate chooses. The gate coefficients g act on the
bottleneck together with COBOT's scaling, before the head:

    delta = B W_h^T (g * (c_l + gamma_l) * A x)

so a component that is switched off contributes nothing (the update's rank is still at most
the number of active components: the effective-rank signal keeps its meaning). Because g and
(c_l + gamma_l) are both element-wise, LoRA and GaRA fold COBOT into their factors,
A' = diag(c_l + gamma_l) A and B' = B W_h^T, once per forward; GaRA's evaluation path
(compute only the active components) then stays exact with COBOT.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

# W_h's block form, one (sign, component) per block; components 0..3 are R, I, J, K.
QUATERNION_BLOCKS = (
    ((+1, 0), (+1, 1), (+1, 2), (+1, 3)),
    ((-1, 1), (+1, 0), (+1, 3), (-1, 2)),
    ((-1, 2), (-1, 3), (+1, 0), (+1, 1)),
    ((-1, 3), (+1, 2), (-1, 1), (+1, 0)),
)


def hamilton_matrices() -> torch.Tensor:
    """H (4, 4, 4): H[m] is the 4x4 sign pattern of component m in the block form."""
    h = torch.zeros(4, 4, 4)
    for row, blocks in enumerate(QUATERNION_BLOCKS):
        for col, (sign, m) in enumerate(blocks):
            h[m, row, col] = sign
    return h


def quaternion_weight(blocks: torch.Tensor, hamilton: torch.Tensor) -> torch.Tensor:
    """blocks (..., 4, n, n) = R, I, J, K -> W_h (..., 4n, 4n) = sum_m kron(H_m, blocks_m)."""
    n = blocks.shape[-1]
    # (m, a, 1, b, 1) * (..., m, 1, i, 1, j) summed over m -> (..., a, i, b, j). A broadcast
    # product rather than einsum: its gradient keeps the parameter's strides, which DDP's
    # bucket views expect (einsum's does not when there is a single unit).
    h = hamilton.to(blocks.dtype)[:, :, None, :, None]
    w = (h * blocks[..., :, None, :, None, :]).sum(dim=-5)
    return w.reshape(*blocks.shape[:-3], 4 * n, 4 * n)


class CobotShared(nn.Module):
    """The tensors all units share: coefficients C (r_max, L) and relation P (L, L)."""

    def __init__(self, unit_ranks: list[int]):
        super().__init__()
        self.unit_ranks = list(unit_ranks)
        units = len(self.unit_ranks)
        self.C = nn.Parameter(torch.ones(max(self.unit_ranks), units))
        self.P = nn.Parameter(torch.eye(units))

    def coefficients(self, rank: int, first: int, count: int) -> torch.Tensor:
        """c_l = (C P)[:rank, l] for units first..first+count-1, as rows (count, rank)."""
        return (self.C[:rank] @ self.P[:, first : first + count]).T

    def extra_repr(self) -> str:
        return f"units={len(self.unit_ranks)}, r_max={self.C.shape[0]}"


class CobotUnits(nn.Module):
    """The COBOT units of one adapter layer: ``parts`` paths x one unit per rank space.

    Holds each unit's own gamma and quaternion head; C and P come from the CobotShared that
    ``connect_units`` binds. The bottleneck is (parts, R) with R = sum(spaces); unit
    (space s, part p) is column ``first + s * parts + p`` of C P.
    """

    def __init__(self, parts: int, spaces: tuple[int, ...]):
        super().__init__()
        bad = [r for r in spaces if r % 4]
        if bad:
            raise ValueError(f"COBOT's quaternion head needs ranks divisible by 4, got {list(spaces)}")
        self.parts, self.spaces = parts, tuple(spaces)
        self.gamma = nn.Parameter(torch.ones(parts, sum(spaces)))
        heads = []
        for r in spaces:
            blocks = torch.zeros(parts, 4, r // 4, r // 4)
            blocks[:, 0] = torch.eye(r // 4)  # R = I, I = J = K = 0: W_h = I at the start
            heads.append(nn.Parameter(blocks))
        self.heads = nn.ParameterList(heads)
        self.register_buffer("hamilton", hamilton_matrices(), persistent=False)
        self.cuts = [slice(end - r, end) for r, end in zip(spaces, accumulate(spaces), strict=True)]
        self.first: int | None = None
        self._shared: CobotShared | None = None

    @property
    def unit_ranks(self) -> list[int]:
        return [r for r in self.spaces for _ in range(self.parts)]

    def bind(self, shared: CobotShared, first: int) -> None:
        # Not registered as a submodule: C and P must exist once in the model (one state-dict
        # entry, one DDP bucket slot), owned by the model's root, and only be read here.
        object.__setattr__(self, "_shared", shared)
        self.first = first

    def scales(self) -> torch.Tensor:
        """(parts, R): c_l + gamma_l for every unit, laid out like the bottleneck."""
        if self._shared is None:
            raise RuntimeError("COBOT units are not connected; attach adapters with gara.models.inject")
        cols = [
            self._shared.coefficients(r, self.first + s * self.parts, self.parts)
            for s, r in enumerate(self.spaces)
        ]
        return torch.cat(cols, dim=1) + self.gamma

    def head_weights(self) -> list[torch.Tensor]:
        """Per rank space, W_h for every part: (parts, r, r)."""
        return [quaternion_weight(blocks, self.hamilton) for blocks in self.heads]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Token path: bottleneck z (..., parts, R) -> head output h (..., parts, R)."""
        u = z * self.scales()
        h = [
            torch.einsum("...pr,prs->...ps", u[..., cut], w)
            for cut, w in zip(self.cuts, self.head_weights(), strict=True)
        ]
        return h[0] if len(h) == 1 else torch.cat(h, dim=-1)

    def fold_into_up(self, up: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per part, B (out_p, R) -> B W_h^T (block-diagonal over spaces): B h = (B W_h^T) u."""
        heads = self.head_weights()
        return [
            torch.cat([b[:, cut] @ w[i].T for cut, w in zip(self.cuts, heads, strict=True)], dim=1)
            for i, b in enumerate(up)
        ]

    def extra_repr(self) -> str:
        return f"parts={self.parts}, spaces={list(self.spaces)}, first_unit={self.first}"


def connect_units(model: nn.Module, *, gamma: float) -> CobotShared | None:
    """Number every COBOT unit of ``model`` in module order and bind them to one new
    CobotShared (returned; the caller registers it on the model), every unit's gamma starting
    at ``gamma`` (AdapterConfig.cobot_gamma). None without units."""
    groups = [m for m in model.modules() if isinstance(m, CobotUnits)]
    if not groups:
        return None
    with torch.no_grad():
        for group in groups:
            group.gamma.fill_(gamma)
    ranks: list[int] = []
    firsts = []
    for group in groups:
        firsts.append(len(ranks))
        ranks += group.unit_ranks
    shared = CobotShared(ranks)
    for group, first in zip(groups, firsts, strict=True):
        group.bind(shared, first)
    return shared

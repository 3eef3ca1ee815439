"""What every adapter layer is: a frozen module it wraps, plus the adapter's own tensors."""

from __future__ import annotations

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """Base of LoRA, GaRA and Adaptformer layers (what ``inject`` puts in place of a module).

    Subclasses set ``part_names`` (the adapted output groups, e.g. ("q", "v")), implement
    :meth:`adapted` (the base's output plus the adapter's update) and may hold a COBOT unit
    group as ``self.cobot`` (see cobot.py). ``adapter_enabled`` is the switch ``forward`` reads
    (peft's pattern): off, the layer is exactly its frozen base (WeSAM's anchor).
    """

    adapter_kind = "adapter"
    part_names: tuple[str, ...] = ("out",)

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.cobot: nn.Module | None = None
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapted(x) if self.adapter_enabled else self.base(x)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement adapted()")

    def train(self, mode: bool = True) -> AdapterLayer:
        super().train(mode)
        # The frozen base keeps inference behaviour (dropout off, BatchNorm statistics fixed),
        # so an adapter trains against exactly the model it will run on.
        self.base.train(False)
        return self

    @property
    def ranks(self) -> list[int]:
        """Bottleneck width(s), for reports (GaRA: [r_L, r_H])."""
        return [self.rank]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """This layer's own trainable tensors (not the frozen base)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    def cobot_parameter_count(self) -> int:
        """Parameters of this layer's COBOT units (gamma and quaternion heads); 0 without COBOT."""
        return sum(p.numel() for n, p in self.adapter_parameters().items() if n.startswith("cobot."))

"""WeSAM's anchor: the frozen pretrained model, run as the adapted segmenter with adapters off.

Every adapter layer (LoRA, GaRA, Adaptformer, ...) adds its update to the output of the frozen
module it wraps (``layer.base``). Running each adapter layer as its base therefore IS the
pretrained model, exactly: the same weights and the same arithmetic, checked bit for bit in
tests/test_wesam.py. That beats a separate frozen copy: no second set of base weights per
worker (ViT-H: 2.5 GB), nothing to keep in sync, and by construction the very base whose
sha256 the adapter records. The cost is one extra no-grad forward either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from gara.models.inject import adapter_layers


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every adapter layer of ``model`` computes only its frozen base."""
    layers = list(adapter_layers(model).values())
    try:
        for layer in layers:
            # An instance attribute shadows the class's forward for this layer only.
            layer.forward = layer.base.forward
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)

"""WeSAM's anchor: the frozen pretrained model, run as the adapted segmenter with adapters off.

Every adapter layer (LoRA, GaRA, Adaptformer, ...) adds its update to the output of the frozen
module it wraps (``layer.base``), and computes only that base while its ``adapter_enabled``
switch is off. Running with every switch off therefore IS the pretrained model, exactly: the
same weights and the same arithmetic, checked bit for bit in tests/test_wesam.py.
That beats a separate frozen copy: no second set of base weights per worker (ViT-H: 2.5 GB),
nothing to keep in sync, and by construction the very base whose sha256 the adapter records.
The cost is one extra no-grad forward either way.
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
    previous = [layer.adapter_enabled for layer in layers]
    try:
        for layer in layers:
            layer.adapter_enabled = False
        yield model
    finally:
        for layer, enabled in zip(layers, previous, strict=True):
            layer.adapter_enabled = enabled

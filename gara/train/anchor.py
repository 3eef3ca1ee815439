"""The frozen pretrained model, run as the adapted segmenter with adapters off: WeSAM's anchor
and distillation's teacher.

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
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from gara import precision
from gara.models.inject import adapter_layers
from gara.models.segmenter import Prompts, Segmenter, SegmenterOutput


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


def frozen_base_pass(
    segmenter: Segmenter, images: torch.Tensor, prompts: Sequence[Prompts], autocast: torch.autocast | None,
    embeddings: bool = True,
) -> tuple[SegmenterOutput, torch.Tensor | None]:
    """The frozen base's answer on preprocessed ``images`` (no grad): its outputs and, when
    asked, its image embeddings."""
    with torch.no_grad(), adapters_disabled(segmenter), precision.or_nothing(autocast):
        encoded = segmenter.encode(images)
        return segmenter.decode(encoded, prompts), segmenter.image_embedding(encoded) if embeddings else None

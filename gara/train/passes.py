"""The module DDP wraps for methods whose loss also reads the image embedding (WeSAM's
contrast, distillation's feature term): one forward returns the decoder's outputs and the
embeddings. One forward (not an encode and a separate decode) keeps DDP to one reduction per
step."""

from __future__ import annotations

import torch
from torch import nn

from gara.models.segmenter import Prompts, Segmenter, SegmenterOutput


class SegmentAndEmbed(nn.Module):
    """The adapted segmenter's forward, returning (outputs, image embeddings)."""

    def __init__(self, segmenter: Segmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: torch.Tensor, prompts: list[Prompts]) -> tuple[SegmenterOutput, torch.Tensor]:
        embeddings = self.segmenter.encode(images)
        return self.segmenter.decode(embeddings, prompts), self.segmenter.image_embedding(embeddings)

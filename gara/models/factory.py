"""Build a ready segmenter (base + optional adapter) from the typed model config."""

from __future__ import annotations

from gara.config import ModelConfig
from gara.models.backbones import build_backbone
from gara.models.inject import attach_adapter
from gara.models.segmenter import Segmenter


def build_segmenter(config: ModelConfig, with_adapter: bool = True, pretrained: bool = True) -> Segmenter:
    """The frozen base named by ``config`` with fresh adapters (or none: the frozen baseline)."""
    backbone = build_backbone(
        config.backbone,
        checkpoint=config.checkpoint,
        checkpoint_sha256=config.checkpoint_sha256,
        pretrained=pretrained,
        s3_endpoint_url=config.s3_endpoint_url,
    )
    segmenter = Segmenter(backbone)
    if with_adapter:
        attach_adapter(segmenter, config.adapter)
    return segmenter

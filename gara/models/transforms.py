"""Per-backbone image preprocessing and the matching prompt / mask coordinate transforms.

SAM and LiteMedSAM resize the longest side to a fixed size and pad bottom-right to a square;
SAM 2.1 stretches the image to the square (its own ``SAM2Transforms``). They also differ in the
target size and in how pixel values are normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ImageMeta:
    """Where an image came from: its original (H, W) and its resized, unpadded (h, w)."""

    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass(frozen=True)
class ImageTransform:
    """Resize to a ``size`` x ``size`` square + normalisation.

    resize:
      - "longest_side": scale so the longest side is ``size``, pad bottom-right (SAM, LiteMedSAM);
      - "stretch": scale each side to ``size`` (SAM 2.1; its decoder's masks are resized back
        to the image directly).
    normalization:
      - "mean_std": (x - mean) / std on 0-255 values (segment-anything);
      - "min_max": per-image rescale to [0, 1] (LiteMedSAM's own inference scheme).
    """

    size: int
    normalization: Literal["mean_std", "min_max"] = "mean_std"
    resize: Literal["longest_side", "stretch"] = "longest_side"
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD

    def resized_shape(self, original_size: tuple[int, int]) -> tuple[int, int]:
        if self.resize == "stretch":
            return self.size, self.size
        h, w = original_size
        scale = self.size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def check_image(self, image: np.ndarray) -> None:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"image must be an RGB array of shape (H, W, 3), got {shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 (0-255), got dtype {image.dtype}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"image is empty: shape {image.shape}")

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, ImageMeta]:
        """RGB uint8 (H, W, 3) -> float tensor (3, size, size) and its ImageMeta."""
        self.check_image(image)
        original = (int(image.shape[0]), int(image.shape[1]))
        h, w = self.resized_shape(original)
        # torch.from_numpy needs a writable array (images read from disk may be read-only).
        pixels = image if image.flags.writeable and image.flags.c_contiguous else image.copy(order="C")
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
        if (h, w) != original:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = x[0]
        if self.normalization == "mean_std":
            mean = torch.tensor(self.pixel_mean).view(3, 1, 1)
            std = torch.tensor(self.pixel_std).view(3, 1, 1)
            x = (x - mean) / std
        else:
            lo, hi = x.min(), x.max()
            x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
        x = F.pad(x, (0, self.size - w, 0, self.size - h))
        return x, ImageMeta(original, (h, w))

    def apply_coords(self, coords: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
        """(..., 2) x,y coordinates in original pixels -> model input pixels."""
        oh, ow = meta.original_size
        h, w = meta.input_size
        scale = torch.tensor([w / ow, h / oh], dtype=coords.dtype, device=coords.device)
        return coords * scale

    def apply_boxes(self, boxes: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
        """(K, 4) x0,y0,x1,y1 boxes in original pixels -> model input pixels."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), meta).reshape(-1, 4)

    def postprocess_masks(self, low_res: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
        """Decoder logits (K, C, h', w') -> logits at the original image size (K, C, H, W)."""
        if self.resize == "stretch":  # nothing padded: straight back to the image (SAM2Transforms)
            return F.interpolate(low_res, meta.original_size, mode="bilinear", align_corners=False)
        masks = F.interpolate(low_res, (self.size, self.size), mode="bilinear", align_corners=False)
        h, w = meta.input_size
        masks = masks[..., :h, :w]
        return F.interpolate(masks, meta.original_size, mode="bilinear", align_corners=False)

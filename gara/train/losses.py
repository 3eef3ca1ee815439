"""Training loss: focal + dice on the mask logits, MSE on the predicted IoU.

Where the loss is computed: at the mask decoder's low-res logits resolution (L x L, e.g.
64 x 64 for a 256 px input, 256 x 256 for 1024 px). The ground truth is brought into that
frame with the segmenter's own transform (resize the longest side to S and pad bottom-right
to S x S, or stretch to S x S for SAM 2.1; :func:`gt_at_logits`), then area-averaged down to
L x L and binarised at 0.5. Only the cells that cover the resized image are scored; the
padding (if any) is left out, as it is when
logits are upsampled to the original size. This is exact for the frame (the same cells
``postprocess_masks`` maps back to the image) and far cheaper than upsampling every logit
map to the original resolution for the backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gara.config import TrainConfig
from gara.models.transforms import ImageMeta, ImageTransform

FOCAL_GAMMA = 2.0
FOCAL_ALPHA = 0.25


def gt_at_logits(
    masks: np.ndarray | torch.Tensor, meta: ImageMeta, transform: ImageTransform, logits_size: int
) -> torch.Tensor:
    """Bool masks (K, H, W) in original pixels -> float {0, 1} targets (K, L, L) aligned with
    the decoder's logits (frame: the transform's S x S input, then S -> L)."""
    m = torch.as_tensor(np.asarray(masks), dtype=torch.float32)[:, None]
    if tuple(m.shape[-2:]) != meta.original_size:
        raise ValueError(f"masks have size {tuple(m.shape[-2:])}, image meta says {meta.original_size}")
    h, w = meta.input_size
    if (h, w) != meta.original_size:
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    size = transform.size
    m = F.pad((m > 0.5).float(), (0, size - w, 0, size - h))
    if size % logits_size:
        raise ValueError(f"logits size {logits_size} does not divide the input size {size}")
    m = F.avg_pool2d(m, size // logits_size)
    return (m[:, 0] > 0.5).float()


def valid_region(meta: ImageMeta, transform: ImageTransform, logits_size: int) -> tuple[int, int]:
    """Rows, columns of the L x L logits that cover the resized (unpadded) image."""
    h, w = meta.input_size
    factor = logits_size / transform.size
    return max(1, math.ceil(h * factor)), max(1, math.ceil(w * factor))


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid focal loss (gamma 2, alpha 0.25), mean over every pixel of every mask."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)
    return (alpha_t * (1 - p_t) ** FOCAL_GAMMA * ce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft dice on sigmoid probabilities, per mask (K, ...), mean over masks."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) against a binary target, per mask (K,); an empty union counts as 1."""
    pred = (logits > 0).flatten(1)
    t = target.flatten(1) > 0.5
    inter = (pred & t).sum(1).float()
    union = (pred | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass
class LossWeights:
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0


def loss_weights(train: TrainConfig) -> LossWeights:
    """The ``train`` section's focal / dice / IoU-MSE weights (every training method's)."""
    return LossWeights(train.focal_weight, train.dice_weight, train.iou_weight)


@dataclass
class LossTerms:
    """The combined loss (with grad) and its detached terms, for logging."""

    total: torch.Tensor
    focal: float
    dice: float
    iou_mse: float
    iou: float  # mean actual IoU of the predictions (x1), a free training-accuracy signal


def segmentation_loss(
    logits: list[torch.Tensor],
    iou_pred: list[torch.Tensor],
    targets: list[torch.Tensor],
    regions: list[tuple[int, int]],
    weights: LossWeights,
) -> LossTerms:
    """Per image: logits (K, 1, L, L), predicted IoU (K, 1), targets (K, L, L), valid (rows,
    cols). Terms are averaged over images weighted by their instance counts (every instance
    counts the same whatever image it is in)."""
    focal = dice = mse = iou_sum = None
    n = 0
    for lg, ip, tg, (rows, cols) in zip(logits, iou_pred, targets, regions, strict=True):
        lg = lg[:, 0, :rows, :cols].float()
        tg = tg[:, :rows, :cols].to(lg.device)
        k = lg.shape[0]
        actual = mask_iou(lg.detach(), tg)
        terms = (
            focal_loss(lg, tg) * k,
            dice_loss(lg, tg) * k,
            F.mse_loss(ip[:, 0].float(), actual, reduction="sum"),
            actual.sum(),
        )
        if focal is None:
            focal, dice, mse, iou_sum = terms
        else:
            sums = (focal, dice, mse, iou_sum)
            focal, dice, mse, iou_sum = (a + b for a, b in zip(sums, terms, strict=True))
        n += k
    if n == 0:
        raise ValueError("segmentation_loss: no instances in the batch")
    focal, dice, mse = focal / n, dice / n, mse / n
    total = weights.focal * focal + weights.dice * dice + weights.iou * mse
    return LossTerms(total, float(focal.detach()), float(dice.detach()), float(mse.detach()),
                     float(iou_sum) / n)

"""Mask quality: per-instance IoU and Dice, and WeSAM's aggregation.

Per instance (prediction vs ground truth, binary masks of the same size):

    IoU  = |P & G| / |P | G|
    Dice = 2 |P & G| / (|P| + |G|)

Both are reported on a 0-100 scale. Empty union (prediction and ground truth both empty)
counts as perfect agreement: IoU = Dice = 100. (The evaluation never meets it, since a
prompt needs a non-empty ground-truth mask, but the definition must not divide by zero.)

Aggregation (WeSAM's metric, shared/methods/wesam.md): per-instance values are first
averaged within each image, then the image means are averaged over images, so an image
with many instances weighs as much as one with a single instance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

SCALE = 100.0
METRICS = ("iou", "dice")  # what every report and comparison computes, per instance


def instance_scores(
    pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """IoU and Dice (0-100) of K instance masks: pred and gt (K, H, W) bool -> two (K,) arrays."""
    pred_t = torch.as_tensor(pred).bool()
    gt_t = torch.as_tensor(gt).bool()
    if pred_t.shape != gt_t.shape or pred_t.ndim != 3:
        raise ValueError(
            f"masks must both be (K, H, W) of the same shape, got {tuple(pred_t.shape)} "
            f"and {tuple(gt_t.shape)}"
        )
    inter = (pred_t & gt_t).flatten(1).sum(1).double()
    union = (pred_t | gt_t).flatten(1).sum(1).double()
    total = pred_t.flatten(1).sum(1).double() + gt_t.flatten(1).sum(1).double()
    empty = union == 0  # then total == 0 too: both empty, perfect agreement
    iou = torch.where(empty, 1.0, inter / union.clamp(min=1))
    dice = torch.where(empty, 1.0, 2 * inter / total.clamp(min=1))
    return (iou * SCALE).numpy(), (dice * SCALE).numpy()


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU (0-100) of one pair of (H, W) bool masks; 100 when both are empty."""
    return float(instance_scores(np.asarray(pred)[None], np.asarray(gt)[None])[0][0])


def mask_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice (0-100) of one pair of (H, W) bool masks; 100 when both are empty."""
    return float(instance_scores(np.asarray(pred)[None], np.asarray(gt)[None])[1][0])


def image_means(
    records: pd.DataFrame, values: Sequence[str], by: Sequence[str] = (), image: str = "image_id"
) -> pd.DataFrame:
    """Per-instance ``values`` averaged within each image (one row per ``by`` + image)."""
    keys = [*by, image]
    return records.groupby(keys, sort=True, dropna=False)[list(values)].mean().reset_index()


def mean_over_images(
    records: pd.DataFrame, values: Sequence[str], by: Sequence[str] = (), image: str = "image_id"
) -> pd.DataFrame:
    """WeSAM's metric per ``by`` group: mean within each image, then mean over images.

    Returns one row per group with the ``values`` columns plus ``n_images`` and
    ``n_instances``; with no ``by`` a single row.
    """
    per_image = image_means(records, values, by, image)
    counts = records.groupby([*by, image], sort=True, dropna=False).size().rename("n").reset_index()
    per_image = per_image.merge(counts, on=[*by, image])
    if not by:
        row = {v: per_image[v].mean() for v in values}
        row.update(n_images=len(per_image), n_instances=int(per_image["n"].sum()))
        return pd.DataFrame([row])
    grouped = per_image.groupby(list(by), sort=True, dropna=False)
    out = grouped[list(values)].mean()
    out["n_images"] = grouped.size()
    out["n_instances"] = grouped["n"].sum()
    return out.reset_index()

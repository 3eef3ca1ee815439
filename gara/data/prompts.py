"""Prompts derived from ground-truth masks: tight boxes and positive points.

Seeded per (seed, image, instance), so evaluation gives every model exactly the same
prompts, and a training run is reproducible.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from gara.models.segmenter import Prompts
from gara.seeding import seeded_rng

PromptKind = Literal["box", "point"]
PROMPT_KINDS: tuple[PromptKind, ...] = ("box", "point")


def tight_box(mask: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 (exclusive ends, pixels) of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot make a prompt from an empty mask")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def positive_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points drawn uniformly from the mask's pixels (pixel centres), shape (n, 2) x, y."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot make a prompt from an empty mask")
    idx = rng.choice(len(xs), size=n, replace=len(xs) < n)
    return np.stack([xs[idx] + 0.5, ys[idx] + 0.5], axis=1).astype(np.float32)


def prompts_from_masks(
    masks: np.ndarray,
    kind: PromptKind,
    n_points: int,
    seed: int,
    keys: list[object],
) -> Prompts:
    """One prompt per instance mask (K, H, W). ``keys`` (one per instance, e.g. the source
    annotation id) seed the point draws, so the same instance gets the same points."""
    if kind == "box":
        return Prompts(boxes=torch.from_numpy(np.stack([tight_box(m) for m in masks])))
    if kind != "point":
        raise ValueError(f"prompt kind {kind!r}: choose one of {PROMPT_KINDS}")
    draws = zip(masks, keys, strict=True)
    points = np.stack([positive_points(m, n_points, seeded_rng("points", seed, k)) for m, k in draws])
    labels = np.ones(points.shape[:2], dtype=np.int64)
    return Prompts(points=torch.from_numpy(points), labels=torch.from_numpy(labels))

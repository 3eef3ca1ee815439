"""WeSAM's two views of a training image: weak (random flips) and strong (weak + photometric).

Flips move the prompts with the image. The strong view changes pixel values only (posterize,
equalize, sharpen, solarize, brightness/contrast, shadow: WeSAM's list, each with p = 0.5 as
in its albumentations pipeline), so one set of prompts serves both views and the teacher's
pseudo-labels line up cell for cell with the student's logits.

Every draw is seeded by the caller (seed, epoch, image id): a batch is the same in every
process and after a resume.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from gara.models.segmenter import Prompts


def flip_prompts(prompts: Prompts, size: tuple[int, int], horizontal: bool, vertical: bool) -> Prompts:
    """Prompts (pixels of an image of ``size`` (H, W)) as they sit in the flipped image."""
    h, w = size
    boxes, points = prompts.boxes, prompts.points
    if boxes is not None:
        boxes = boxes.clone()
        if horizontal:
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        if vertical:
            boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    if points is not None:
        points = points.clone()
        if horizontal:
            points[..., 0] = w - points[..., 0]
        if vertical:
            points[..., 1] = h - points[..., 1]
    return Prompts(boxes=boxes, points=points, labels=prompts.labels)


def weak_view(image: np.ndarray, prompts: Prompts, rng: np.random.Generator) -> tuple[np.ndarray, Prompts]:
    """Flip left-right and up-down, each with probability 0.5, image and prompts together."""
    horizontal, vertical = (bool(v) for v in rng.random(2) < 0.5)
    if horizontal:
        image = image[:, ::-1]
    if vertical:
        image = image[::-1]
    flipped = flip_prompts(prompts, image.shape[:2], horizontal, vertical)
    return np.ascontiguousarray(image), flipped


STRONG_P = 0.5  # each photometric op applies with this probability (WeSAM's pipeline)


@functools.cache
def _photometric_ops() -> tuple[Any, ...]:
    # Imported here: albumentations costs ~2 s at import and only WeSAM workers need it.
    import albumentations as A

    # p=1: whether an op applies is drawn in strong_view. Seeding an A.Compose instead would
    # switch all six on or off together (its children share the seed).
    return (A.Posterize(p=1), A.Equalize(p=1), A.Sharpen(p=1), A.Solarize(p=1),
            A.RandomBrightnessContrast(p=1), A.RandomShadow(p=1))


def strong_view(image: np.ndarray, seed: int) -> np.ndarray:
    """Photometric changes only (never geometry) of a uint8 RGB image, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    for op in _photometric_ops():
        if rng.random() < STRONG_P:
            op.set_random_seed(int(rng.integers(2**31)))
            image = op(image=image)["image"]
    return image

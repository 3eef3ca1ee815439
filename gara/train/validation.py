"""Quick per-epoch validation: box prompts on a fixed, seeded subset, mean IoU x100.

Scored at each image's original resolution (the same post-processing ``predict`` uses), so
the number is comparable with the evaluation stage's box IoU on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gara.data.dataset import InstanceDataset
from gara.data.prompts import prompts_from_masks
from gara.models.adapters.gara import effective_ranks
from gara.models.segmenter import Segmenter
from gara.seeding import seeded_rng
from gara.train.batches import usable_instances


@dataclass
class ValidationResult:
    iou: float  # mean IoU x100 over instances
    instances: int
    images: int
    effective_rank: float | None  # mean active GaRA components per layer (eval gates); None: no GaRA


def validation_indices(dataset: InstanceDataset, max_images: int, seed: int) -> list[int]:
    """A seeded subset, the same every epoch and every resume (so epochs are comparable)."""
    n = len(dataset)
    if n <= max_images:
        return list(range(n))
    return sorted(int(i) for i in seeded_rng("val-subset", seed).choice(n, size=max_images, replace=False))


@torch.no_grad()
def quick_validation(
    segmenter: Segmenter,
    dataset: InstanceDataset,
    indices: list[int],
    max_instances: int,
    autocast: torch.autocast | None = None,
) -> ValidationResult:
    was_training = segmenter.training
    segmenter.eval()
    ious: list[float] = []
    ranks: list[float] = []
    images = 0
    try:
        for i in indices:
            sample = dataset[i]
            idx = usable_instances(sample)[:max_instances]
            if not len(idx):
                continue
            masks = sample["masks"][idx]
            batch, metas = segmenter.preprocess([sample["image"]])
            prompts = prompts_from_masks(masks, "box", 1, 0, list(sample["ann_ids"][idx]))
            if autocast is not None:
                with autocast:
                    out = segmenter(batch, [segmenter.prompts_to_input(prompts, metas[0])])
            else:
                out = segmenter(batch, [segmenter.prompts_to_input(prompts, metas[0])])
            pred = (segmenter.masks_at_input_resolution(out, metas)[0].float() > 0).cpu().numpy()
            inter = (pred & masks).reshape(len(idx), -1).sum(1)
            union = (pred | masks).reshape(len(idx), -1).sum(1)
            ious.extend((inter / np.maximum(union, 1)).tolist())
            layer_ranks = effective_ranks(segmenter, 1)
            if layer_ranks:
                ranks.append(float(torch.stack(list(layer_ranks.values())).mean()))
            images += 1
    finally:
        segmenter.train(was_training)
    if not ious:
        raise ValueError(f"{dataset.root}: the validation subset has no usable instance")
    return ValidationResult(
        iou=100.0 * float(np.mean(ious)),
        instances=len(ious),
        images=images,
        effective_rank=float(np.mean(ranks)) if ranks else None,
    )

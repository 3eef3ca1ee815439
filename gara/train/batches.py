"""Dataset samples -> one training batch: images in the model's frame, one prompt kind per
sample, at most ``max_instances`` instances, and targets aligned with the decoder's logits.

Every random choice is seeded by (seed, epoch, image id), so a batch is the same in every
process and after a resume, whichever worker draws it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gara.config import PromptConfig
from gara.data.dataset import Sample
from gara.data.prompts import prompts_from_masks
from gara.models.segmenter import Prompts, Segmenter
from gara.models.transforms import ImageMeta
from gara.seeding import derive_seed, seeded_rng
from gara.train.losses import gt_at_logits, valid_region


@dataclass
class TrainBatch:
    images: torch.Tensor  # (B, 3, S, S) on the model's device
    metas: list[ImageMeta]
    prompts: list[Prompts]  # in the input frame, on the model's device
    targets: list[torch.Tensor]  # (K, L, L) float {0, 1}, aligned with the logits
    regions: list[tuple[int, int]]  # valid logits rows, cols per image
    kinds: list[str]
    image_ids: list[int]
    # False when no sample had a usable instance: the batch then holds one whole-image box
    # so every DDP rank still runs forward/backward (collectives stay in step); its loss is
    # multiplied by 0.
    has_instances: bool = True

    @property
    def num_images(self) -> int:
        return len(self.metas)

    @property
    def num_instances(self) -> int:
        return sum(len(t) for t in self.targets)


def logits_size(segmenter: Segmenter) -> int:
    """Side of the decoder's low-res logits: 4 x the prompt encoder's embedding grid."""
    return 4 * int(segmenter.prompt_encoder.image_embedding_size[0])


def usable_instances(sample: Sample) -> np.ndarray:
    """Indices of instances a prompt can be drawn from: non-crowd, non-empty masks."""
    masks = sample["masks"]
    keep = ~sample["iscrowd"] & masks.reshape(len(masks), -1).any(axis=1)
    return np.flatnonzero(keep)


def at_most(
    idx: np.ndarray, max_instances: int, stream: str, seed: int, epoch: int, image_id: int
) -> np.ndarray:
    """``idx`` itself, or a sorted draw of ``max_instances`` of them seeded by (stream, seed,
    epoch, image id)."""
    if len(idx) > max_instances:
        rng = seeded_rng(stream, seed, epoch, image_id)
        idx = np.sort(rng.choice(idx, size=max_instances, replace=False))
    return idx


def choose_instances(sample: Sample, max_instances: int, seed: int, epoch: int) -> np.ndarray:
    return at_most(usable_instances(sample), max_instances, "instances", seed, epoch, sample["image_id"])


def choose_kind(kinds: list[str], seed: int, epoch: int, image_id: int) -> str:
    if not kinds:
        raise ValueError("prompts.kinds is empty: give at least one of box, point")
    return kinds[int(seeded_rng("prompt-kind", seed, epoch, image_id).integers(len(kinds)))]


def build_batch(
    segmenter: Segmenter,
    samples: list[Sample],
    prompts: PromptConfig,
    seed: int,
    epoch: int,
) -> TrainBatch:
    """Turn samples into a training batch. Samples with no usable instance are left out."""
    if not samples:
        raise ValueError("build_batch: no samples")
    size = logits_size(segmenter)
    used, chosen, kinds = [], [], []
    for sample in samples:
        idx = choose_instances(sample, prompts.max_instances, seed, epoch)
        if len(idx):
            used.append(sample)
            chosen.append(idx)
            kinds.append(choose_kind(list(prompts.kinds), seed, epoch, sample["image_id"]))
    if not used:
        return _placeholder_batch(segmenter, samples[0], size)
    images, metas = segmenter.preprocess([s["image"] for s in used])
    point_seed = derive_seed("train-points", seed, epoch)  # new points every epoch, reproducible
    batch_prompts, targets, regions = [], [], []
    for sample, idx, kind, meta in zip(used, chosen, kinds, metas, strict=True):
        masks = sample["masks"][idx]
        raw = prompts_from_masks(masks, kind, prompts.n_points, point_seed, list(sample["ann_ids"][idx]))
        batch_prompts.append(segmenter.prompts_to_input(raw, meta))
        targets.append(gt_at_logits(masks, meta, segmenter.transform, size).to(images.device))
        regions.append(valid_region(meta, segmenter.transform, size))
    return TrainBatch(images, metas, batch_prompts, targets, regions, kinds,
                      [int(s["image_id"]) for s in used])


def _placeholder_batch(segmenter: Segmenter, sample: Sample, size: int) -> TrainBatch:
    images, metas = segmenter.preprocess([sample["image"]])
    h, w = metas[0].original_size
    box = Prompts(boxes=torch.tensor([[0.0, 0.0, float(w), float(h)]]))
    target = torch.zeros(1, size, size, device=images.device)
    return TrainBatch(images, metas, [segmenter.prompts_to_input(box, metas[0])], [target],
                      [valid_region(metas[0], segmenter.transform, size)], ["box"],
                      [int(sample["image_id"])], has_instances=False)

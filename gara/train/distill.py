"""Label-free robustification: the frozen base on a clean image teaches the adapted model on a
corrupted copy of it (``train.method: distill``, ``train.distill``).

Every image ``gara corrupt`` writes knows its clean source (``source_image_id``; the clean copy
is the variant ``corruption: clean``). One step, per image of the batch:

1. prompts: ``prompts_per_image`` random boxes over the image (sides between ``min_box_fraction``
   and ``max_box_fraction`` of the image's) or as many random clicks (``prompts``: one kind
   drawn per image), seeded by (seed, epoch, image id); nothing is read from annotations, and
   samples carry no masks (the step refuses one that does);
2. teacher: the frozen base (the adapted segmenter with its adapters off, exact: anchor.py) on
   the CLEAN source, no grad;
3. student: the adapted model on the variant: a corrupted copy, or the clean copy itself
   (which keeps Clear where it was);
4. loss = kl KL(teacher || student) per pixel + dice (1 - soft dice of the two probability
   maps) + iou MSE(predicted IoU, teacher's) [+ feature MSE(student's image embedding,
   teacher's)], at the decoder's low-res logits on the valid cells, instances weighted equally;
   logged as ``loss/kl``, ``loss/soft_dice``, ``loss/iou_to_teacher`` (``loss/feature``).

Every term is exactly 0 when the student's outputs equal the teacher's, so adapters at their
init (which reproduce the base) start at zero loss on clean pairs and are pulled only where
a corruption moves the answer: training stays near the base. (A hard-target focal + dice, as
the supervised recipe uses, is not 0 there: it would push a correct student towards
saturated logits.) The dice uses squared denominators, (2 sum(p q) + eps) / (sum p^2 + sum q^2
+ eps), which is 1 exactly when p = q, however small p is (a confidently empty mask).
``teacher_agreement`` (IoU of the student's mask against the teacher's) is logged every step.

Geometric corruptions (zoom blur, elastic, frosted glass) move pixels, so the clean source's
answer no longer lines up with the variant: those variants are left out, and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gara import precision
from gara.config import DistillConfig, TrainConfig
from gara.data.coco import DatasetFormatError, is_image_folder
from gara.data.corrupt import CLEAN
from gara.data.corruptions import GEOMETRIC_NAMES
from gara.data.dataset import InstanceDataset, read_entry_image
from gara.models.adapters.gara import effective_ranks
from gara.models.segmenter import Prompts, Segmenter, SegmenterOutput
from gara.seeding import seeded_rng
from gara.train.anchor import frozen_base_pass
from gara.train.batches import choose_kind, logits_size
from gara.train.losses import mask_iou, valid_region
from gara.train.optim import apply_gradients
from gara.train.passes import SegmentAndEmbed

logger = logging.getLogger(__name__)

DICE_EPS = 1e-6  # keeps an all-zero pair at distance 0; far below any real sum of squares


# --- data ----------------------------------------------------------------------------------
class DistillSample(TypedDict):
    image: np.ndarray  # (H, W, 3) uint8 RGB: what the student sees (a variant, maybe the clean copy)
    clean: np.ndarray  # (H, W, 3) uint8 RGB: its clean source, what the teacher sees
    image_id: int
    file_name: str
    clean_file_name: str
    meta: dict[str, Any]  # corruption, severity, source_image_id


class PairedImages:
    """The (variant, clean source) pairs of a ``gara corrupt`` output, labelled or not.

    The folder is validated as every dataset is (``on_error`` as for training; annotations, if
    any, are checked there but never given to training). Variants under a geometric corruption,
    and variants whose clean copy is not in the set (skipped, or missing), are left out, logged
    and counted (``geometric_skipped``, ``unpaired_skipped``).
    """

    def __init__(self, root: str | Path, on_error: str = "fail") -> None:
        if is_image_folder(root):
            raise DatasetFormatError(f"{root}: a plain folder of images; train.method distill trains on its "
                                     f"clean/corrupted pairs: run `gara corrupt --data {root} --out DIR` and "
                                     "train on DIR")
        self.images = InstanceDataset(root, on_error=on_error)
        self.root = self.images.root
        entries = [self.images.entry(i)[0] for i in range(len(self.images))]
        unpaired = [e["file_name"] for e in entries if "source_image_id" not in e or "corruption" not in e]
        if unpaired:
            raise DatasetFormatError(
                f"{self.root}: train.method distill trains on clean/corrupted pairs, but {len(unpaired)} "
                f"image entries (e.g. {unpaired[0]}) have no source_image_id/corruption: run "
                f"`gara corrupt --data {self.root} --out DIR` and train on DIR")
        clean = {e["source_image_id"]: e for e in entries if e["corruption"] == CLEAN}
        aligned = [e for e in entries if e["corruption"] not in GEOMETRIC_NAMES]
        self.geometric_skipped = len(entries) - len(aligned)
        self.pairs = [(e, clean[e["source_image_id"]]) for e in aligned if e["source_image_id"] in clean]
        self.unpaired_skipped = len(aligned) - len(self.pairs)
        if self.geometric_skipped:
            logger.warning("%s: %d variant(s) under a geometric corruption (%s) left out: their clean "
                           "source no longer lines up", self.root, self.geometric_skipped,
                           ", ".join(GEOMETRIC_NAMES))
        if self.unpaired_skipped:
            logger.warning("%s: %d variant(s) left out: their clean copy is not in the set", self.root,
                           self.unpaired_skipped)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> DistillSample:
        entry, source = self.pairs[index]
        image, clean = read_entry_image(self.root, entry), read_entry_image(self.root, source)
        if image.shape != clean.shape:
            raise ValueError(f"{self.root / entry['file_name']} is {image.shape[1]}x{image.shape[0]} but its "
                             f"clean source {source['file_name']} is {clean.shape[1]}x{clean.shape[0]}")
        return DistillSample(
            image=image, clean=clean, image_id=int(entry["id"]), file_name=str(entry["file_name"]),
            clean_file_name=str(source["file_name"]),
            meta={k: entry.get(k) for k in ("corruption", "severity", "source_image_id")},
        )


def random_boxes(height: int, width: int, config: DistillConfig, rng: np.random.Generator) -> np.ndarray:
    """``config.prompts_per_image`` boxes (K, 4) xyxy in pixels, inside the image."""
    n = config.prompts_per_image
    fractions = rng.uniform(config.min_box_fraction, config.max_box_fraction, size=(n, 2))
    sizes = np.maximum(fractions * [width, height], 1.0)
    x0 = rng.uniform(0, 1, n) * (width - sizes[:, 0])
    y0 = rng.uniform(0, 1, n) * (height - sizes[:, 1])
    return np.stack([x0, y0, x0 + sizes[:, 0], y0 + sizes[:, 1]], axis=1).astype(np.float32)


def random_prompts(height: int, width: int, kind: str, config: DistillConfig, rng: np.random.Generator
                   ) -> Prompts:
    """``config.prompts_per_image`` prompts of ``kind`` over an image: boxes, or one positive
    click each (uniform over the image)."""
    if kind == "box":
        return Prompts(boxes=torch.from_numpy(random_boxes(height, width, config, rng)))
    clicks = rng.uniform(0, 1, size=(config.prompts_per_image, 1, 2)) * [width, height]
    return Prompts(points=torch.from_numpy(clicks.astype(np.float32)),
                   labels=torch.ones(config.prompts_per_image, 1, dtype=torch.int64))


@dataclass
class DistillBatch:
    student: torch.Tensor  # (B, 3, S, S) the variants, preprocessed
    teacher: torch.Tensor  # (B, 3, S, S) their clean sources, preprocessed
    prompts: list[Prompts]  # in the input frame (the same for both: the geometry is shared)
    regions: list[tuple[int, int]]  # valid logits rows, cols per image
    image_ids: list[int]

    @property
    def num_images(self) -> int:
        return len(self.image_ids)


def build_distill_batch(
    segmenter: Segmenter, samples: list[DistillSample], config: DistillConfig, seed: int, epoch: int
) -> DistillBatch:
    """Pairs -> both image batches and one set of random prompts per pair. Refuses samples
    carrying masks: the student must never see one."""
    if not samples:
        raise ValueError("build_distill_batch: no samples")
    for sample in samples:
        if "masks" in sample:
            raise TypeError(f"distillation trains without labels, but sample {sample['image_id']} carries "
                            "masks: load the training data with PairedImages")
    student, metas = segmenter.preprocess([s["image"] for s in samples])
    teacher, _ = segmenter.preprocess([s["clean"] for s in samples])
    size = logits_size(segmenter)
    prompts, regions = [], []
    for sample, meta in zip(samples, metas, strict=True):
        height, width = sample["image"].shape[:2]
        kind = choose_kind(list(config.prompts), seed, epoch, sample["image_id"])
        rng = seeded_rng("distill-prompts", seed, epoch, sample["image_id"])
        prompts.append(segmenter.prompts_to_input(random_prompts(height, width, kind, config, rng), meta))
        regions.append(valid_region(meta, segmenter.transform, size))
    return DistillBatch(student, teacher, prompts, regions, [int(s["image_id"]) for s in samples])


# --- loss ----------------------------------------------------------------------------------
def bernoulli_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL(sigmoid(teacher) || sigmoid(student)) from logits; 0 where they are equal."""
    p = torch.sigmoid(teacher)
    return (p * (F.logsigmoid(teacher) - F.logsigmoid(student))
            + (1 - p) * (F.logsigmoid(-teacher) - F.logsigmoid(-student)))


def soft_dice_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - 2 sum(p q) / (sum p^2 + sum q^2) per mask (K,); 0 when the probabilities are equal."""
    p, q = torch.sigmoid(student).flatten(1), torch.sigmoid(teacher).flatten(1)
    return 1 - (2 * (p * q).sum(1) + DICE_EPS) / ((p * p).sum(1) + (q * q).sum(1) + DICE_EPS)


@dataclass
class DistillTerms:
    total: torch.Tensor  # weighted sum of the terms that are on, with grad
    metrics: dict[str, float]  # loss/kl, loss/soft_dice, loss/iou_to_teacher, loss/feature, teacher_agreement


def distill_loss(
    student: SegmenterOutput,
    teacher: SegmenterOutput,
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor | None,
    regions: list[tuple[int, int]],
    config: DistillConfig,
) -> DistillTerms:
    """The terms (each averaged over instances, every instance counting the same) and their sum."""
    kl = dice = mse = agreement = torch.zeros(())
    n = 0
    for s_logits, t_logits, s_iou, t_iou, (rows, cols) in zip(
            student.low_res_logits, teacher.low_res_logits, student.iou_predictions, teacher.iou_predictions,
            regions, strict=True):
        s = s_logits[:, 0, :rows, :cols].float()
        t = t_logits[:, 0, :rows, :cols].detach().float()
        kl = kl + bernoulli_kl(s, t).flatten(1).mean(1).sum()
        dice = dice + soft_dice_distance(s, t).sum()
        mse = mse + F.mse_loss(s_iou[:, 0].float(), t_iou[:, 0].detach().float(), reduction="sum")
        agreement = agreement + mask_iou(s.detach(), (t > 0).float()).sum()
        n += len(s)
    kl, dice, mse = kl / n, dice / n, mse / n
    parts = [config.kl * kl, config.dice * dice, config.iou * mse]
    metrics = {"loss/kl": float(kl.detach()), "loss/soft_dice": float(dice.detach()),
               "loss/iou_to_teacher": float(mse.detach()), "teacher_agreement": float(agreement) / n}
    if config.feature:
        feature = F.mse_loss(student_embeddings.float(), teacher_embeddings.detach().float())
        parts.append(config.feature * feature)
        metrics["loss/feature"] = float(feature.detach())
    return DistillTerms(torch.stack(parts).sum(), metrics)


# --- one step ------------------------------------------------------------------------------
def distill_step(
    model: nn.Module,
    segmenter: Segmenter,
    batch: DistillBatch,
    optimizer: torch.optim.Optimizer,
    config: DistillConfig,
    grad_clip: float | None,
    autocast: torch.autocast | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[DistillTerms, dict[str, float]]:
    """One optimisation step. ``model`` is the (possibly DDP-wrapped) ``SegmentAndEmbed`` of
    ``segmenter``. Returns the loss terms and the mean effective rank per GaRA layer."""
    # The teacher only ever sees the clean sources.
    teacher, teacher_embeddings = frozen_base_pass(segmenter, batch.teacher, batch.prompts, autocast,
                                                   embeddings=bool(config.feature))
    with precision.or_nothing(autocast):
        student, student_embeddings = model(batch.student, batch.prompts)
    terms = distill_loss(student, teacher, student_embeddings, teacher_embeddings, batch.regions, config)
    apply_gradients(terms.total, optimizer, grad_clip, scaler)
    ranks = {k: float(v.mean()) for k, v in effective_ranks(segmenter, batch.num_images).items()}
    return terms, ranks


class Distill:
    """Distillation as a training method of the shared loop (gara/train/loop.py)."""

    def __init__(self, train: TrainConfig, segmenter: Segmenter):
        self.train, self.config, self.segmenter = train, train.distill, segmenter
        self.module = SegmentAndEmbed(segmenter)
        self.dataset = PairedImages(train.data, train.on_error)

    def batch(self, samples: list[DistillSample], epoch: int) -> DistillBatch:
        return build_distill_batch(self.segmenter, samples, self.config, self.train.seed, epoch)

    def step(
        self,
        model: nn.Module,
        batch: DistillBatch,
        optimizer: torch.optim.Optimizer,
        autocast: torch.autocast | None,
        scaler: torch.amp.GradScaler | None,
        step: int,
    ) -> tuple[float, dict[str, float], dict[str, float]]:
        """(loss, step metrics, effective ranks)."""
        terms, ranks = distill_step(model, self.segmenter, batch, optimizer, self.config,
                                    self.train.grad_clip, autocast, scaler)
        return float(terms.total.detach()), terms.metrics, ranks

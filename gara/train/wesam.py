"""WeSAM: weakly supervised self-training with an anchor (shared/methods/wesam.md).

Networks: the anchor is the frozen base (the same segmenter with its adapters off, see
anchor.py); student and teacher are the SAME adapted model, one forward over the weak and
strong views stacked (no EMA). One step:

1. weak view = flips, strong view = weak + photometric changes (views.py); prompts from weak
   labels only (boxes, clicks, coarse-polygon boxes: gara/data/weak_labels.py), flipped with
   the image, at most ``train.prompts.max_instances`` instances per image;
2. anchor(weak) -> y_a, E_a (no grad); model(weak) -> teacher y_t, E_t; model(strong) ->
   student y_s and its predicted IoU; single-mask outputs;
3. loss = w_self L_self + w_anchor L_anchor + w_contrast L_contrast (train.wesam weights, 0 = off):

   - L_self = 20 focal(y_s, P_t) + dice(y_s, P_t) + MSE(iou_s, IoU(y_s > 0, P_t)), P_t = 1[y_t > 0]
     (the supervised loss of losses.py with pseudo-labels as targets; no confidence filter);
   - L_anchor = 0.5 dice(y_s, P_a) + 0.5 dice(y_t, P_a), P_a = 1[y_a > 0]; the gradient flows
     through both the student and the teacher pass;
   - L_contrast = InfoNCE (tau 0.3) between per-instance prototypes of the teacher and of the
     anchor: masked average pooling of the L2-normalised image embeddings, masks from each
     model's own logits; the matching instance is the positive; zero for a single instance.

Every term is scored at the decoder's low-res logits on the valid (unpadded) cells, as the
supervised loss. Not copied from the released code (wesam.md's "warts"): images are
normalised as the backbone expects, focal alpha / dice smoothing are the clean constants, and
prototypes pool binary masks, not raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gara import precision
from gara.config import TrainConfig, WeSAMConfig
from gara.data.weak_labels import WeakLabelDataset, WeakSample, weak_prompts
from gara.models.adapters.gara import effective_ranks
from gara.models.segmenter import Prompts, Segmenter, SegmenterOutput
from gara.models.transforms import ImageMeta
from gara.seeding import derive_seed, seeded_rng
from gara.train.anchor import frozen_base_pass
from gara.train.batches import at_most, choose_kind, logits_size
from gara.train.losses import LossWeights, dice_loss, loss_weights, segmentation_loss, valid_region
from gara.train.optim import apply_gradients
from gara.train.passes import SegmentAndEmbed
from gara.train.views import strong_view, weak_view

ANCHOR_HALF = 0.5  # L_anchor weighs the student's and the teacher's dice equally


# --- batches -------------------------------------------------------------------------------
@dataclass
class WeSAMBatch:
    weak: torch.Tensor  # (B, 3, S, S) weak views, preprocessed, on the model's device
    strong: torch.Tensor  # (B, 3, S, S) strong views of the same images
    metas: list[ImageMeta]
    prompts: list[Prompts]  # input frame; valid for both views (the strong one adds no geometry)
    regions: list[tuple[int, int]]  # valid logits rows, cols per image
    # False: no sample had an instance; one whole-image box keeps DDP ranks in step, loss x 0.
    has_instances: bool = True

    @property
    def num_images(self) -> int:
        return len(self.metas)


def choose_weak_instances(sample: WeakSample, max_instances: int, seed: int, epoch: int) -> np.ndarray:
    """Non-crowd instances (weak labels have no mask to be empty), at most ``max_instances``."""
    return at_most(np.flatnonzero(~sample["iscrowd"]), max_instances, "wesam-instances", seed, epoch,
                   sample["image_id"])


def build_wesam_batch(
    segmenter: Segmenter,
    samples: list[WeakSample],
    config: WeSAMConfig,
    max_instances: int,
    seed: int,
    epoch: int,
) -> WeSAMBatch:
    """Weak-label samples -> both views and their prompts. Refuses samples carrying masks."""
    if not samples:
        raise ValueError("build_wesam_batch: no samples")
    for sample in samples:
        if "masks" in sample:
            raise TypeError(f"WeSAM trains from weak labels only, but sample {sample['image_id']} carries "
                            "full masks: load the training data with WeakLabelDataset")
    weak_images, strong_images, raw_prompts = [], [], []
    for sample in samples:
        idx = choose_weak_instances(sample, max_instances, seed, epoch)
        if not len(idx):
            continue
        image_id = sample["image_id"]
        kind = choose_kind(list(config.weak_labels), seed, epoch, image_id)
        rng = seeded_rng("wesam-views", seed, epoch, image_id)
        image, prompts = weak_view(sample["image"], weak_prompts(sample, idx, kind), rng)
        weak_images.append(image)
        strong_images.append(strong_view(image, derive_seed("wesam-strong", seed, epoch, image_id)))
        raw_prompts.append(prompts)
    has_instances = bool(raw_prompts)
    if not has_instances:  # a whole-image box on the first image, unflipped
        h, w = samples[0]["image"].shape[:2]
        weak_images = strong_images = [samples[0]["image"]]
        raw_prompts = [Prompts(boxes=torch.tensor([[0.0, 0.0, float(w), float(h)]]))]
    weak, metas = segmenter.preprocess(weak_images)
    strong, _ = segmenter.preprocess(strong_images)
    size = logits_size(segmenter)
    return WeSAMBatch(
        weak, strong, metas,
        [segmenter.prompts_to_input(p, m) for p, m in zip(raw_prompts, metas, strict=True)],
        [valid_region(m, segmenter.transform, size) for m in metas],
        has_instances,
    )


# --- losses --------------------------------------------------------------------------------
def pseudo_labels(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hard labels 1[logit > 0], (K, L, L) per image, without gradient."""
    return [(lg.detach()[:, 0] > 0).float() for lg in logits]


def anchor_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    anchor: list[torch.Tensor],
    regions: list[tuple[int, int]],
) -> torch.Tensor:
    """0.5 dice(y_s, P_a) + 0.5 dice(y_t, P_a), averaged over instances (every instance counts
    the same whatever image it is in)."""
    total, n = None, 0
    for ys, yt, target, (rows, cols) in zip(student, teacher, pseudo_labels(anchor), regions, strict=True):
        target = target[:, :rows, :cols]
        k = len(target)
        term = k * (ANCHOR_HALF * dice_loss(ys[:, 0, :rows, :cols].float(), target)
                    + ANCHOR_HALF * dice_loss(yt[:, 0, :rows, :cols].float(), target))
        total = term if total is None else total + term
        n += k
    return total / max(n, 1)


def prototypes(embedding: torch.Tensor, logits: torch.Tensor, region: tuple[int, int]) -> torch.Tensor:
    """Per-instance prototypes (K, C): the L2-normalised embedding (C, h, w) averaged over each
    instance's mask (logits (K, 1, L, L) > 0, padding cells left out, area-pooled to h x w). An
    empty mask gives a zero prototype (cosine similarity 0 to everything)."""
    rows, cols = region
    masks = torch.zeros_like(logits[:, 0], dtype=torch.float32)
    masks[:, :rows, :cols] = (logits.detach()[:, 0, :rows, :cols] > 0).float()
    factor = masks.shape[-1] // embedding.shape[-1]
    weights = F.avg_pool2d(masks[:, None], factor)[:, 0] if factor > 1 else masks
    unit = F.normalize(embedding.float(), dim=0)
    summed = torch.einsum("khw,chw->kc", weights, unit)
    return summed / weights.sum(dim=(1, 2)).clamp(min=1e-6)[:, None]


def contrastive_loss(query: torch.Tensor, keys: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE: instance i of ``query`` (K, C) should be closest (cosine / tau) to instance i of
    ``keys`` among all K; mean over instances. Exactly 0 for K = 1."""
    logits = F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def instance_contrast(
    teacher_embeddings: torch.Tensor,
    teacher_logits: list[torch.Tensor],
    anchor_embeddings: torch.Tensor,
    anchor_logits: list[torch.Tensor],
    regions: list[tuple[int, int]],
    tau: float,
) -> torch.Tensor:
    """L_contrast of a batch: teacher prototypes against the anchor's, mean over images."""
    losses = [
        contrastive_loss(prototypes(te, tl, r), prototypes(ae, al, r).detach(), tau)
        for te, tl, ae, al, r in zip(teacher_embeddings, teacher_logits, anchor_embeddings, anchor_logits,
                                     regions, strict=True)
    ]
    return torch.stack(losses).mean()


@dataclass
class WeSAMTerms:
    total: torch.Tensor  # the weighted sum of the terms that are on, with grad
    metrics: dict[str, float]  # detached terms for MLflow: loss/self, loss/anchor, loss/contrast, ...


def wesam_loss(
    teacher: SegmenterOutput,
    student: SegmenterOutput,
    teacher_embeddings: torch.Tensor,
    anchor: SegmenterOutput | None,
    anchor_embeddings: torch.Tensor | None,
    regions: list[tuple[int, int]],
    config: WeSAMConfig,
    weights: LossWeights,
) -> WeSAMTerms:
    """The three terms (those with a non-zero weight) and their weighted sum."""
    parts: list[torch.Tensor] = []
    metrics: dict[str, float] = {}
    if config.self_training:
        targets = pseudo_labels(teacher.low_res_logits)
        terms = segmentation_loss(student.low_res_logits, student.iou_predictions, targets, regions, weights)
        parts.append(config.self_training * terms.total)
        metrics.update({"loss/self": float(terms.total.detach()), "loss/self_focal": terms.focal,
                        "loss/self_dice": terms.dice, "loss/self_iou_mse": terms.iou_mse,
                        "pseudo_label_iou": terms.iou})
    if config.anchor:
        term = anchor_loss(student.low_res_logits, teacher.low_res_logits, anchor.low_res_logits, regions)
        parts.append(config.anchor * term)
        metrics["loss/anchor"] = float(term.detach())
    if config.contrastive:
        term = instance_contrast(teacher_embeddings, teacher.low_res_logits, anchor_embeddings,
                                 anchor.low_res_logits, regions, config.tau)
        parts.append(config.contrastive * term)
        metrics["loss/contrast"] = float(term.detach())
    return WeSAMTerms(torch.stack(parts).sum(), metrics)


# --- one step ------------------------------------------------------------------------------
def split_views(out: SegmenterOutput, n: int) -> tuple[SegmenterOutput, SegmenterOutput]:
    """The [weak; strong] forward -> (teacher, student) outputs."""
    return (SegmenterOutput(out.low_res_logits[:n], out.iou_predictions[:n]),
            SegmenterOutput(out.low_res_logits[n:], out.iou_predictions[n:]))


def wesam_step(
    model: nn.Module,
    segmenter: Segmenter,
    batch: WeSAMBatch,
    optimizer: torch.optim.Optimizer,
    config: WeSAMConfig,
    weights: LossWeights,
    grad_clip: float | None,
    autocast: torch.autocast | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[WeSAMTerms, dict[str, float]]:
    """One optimisation step. ``model`` is the (possibly DDP-wrapped) ``SegmentAndEmbed`` of
    ``segmenter``. Returns the loss terms and the mean effective rank per GaRA layer."""
    anchor = anchor_embeddings = None
    if config.anchor or config.contrastive:  # self-training alone never needs the anchor
        anchor, anchor_embeddings = frozen_base_pass(segmenter, batch.weak, batch.prompts, autocast)
    n = batch.num_images
    with precision.or_nothing(autocast):
        out, embeddings = model(torch.cat([batch.weak, batch.strong]), batch.prompts + batch.prompts)
    teacher, student = split_views(out, n)
    terms = wesam_loss(teacher, student, embeddings[:n], anchor, anchor_embeddings, batch.regions, config,
                       weights)
    apply_gradients(terms.total if batch.has_instances else terms.total * 0.0, optimizer, grad_clip, scaler)
    ranks = {k: float(v.mean()) for k, v in effective_ranks(segmenter, 2 * n).items()}
    return terms, ranks


class WeSAM:
    """WeSAM as a training method of the shared loop (gara/train/loop.py): weak-label data, the
    teacher/student module DDP wraps, batches and steps."""

    def __init__(self, train: TrainConfig, segmenter: Segmenter):
        self.train, self.config, self.segmenter = train, train.wesam, segmenter
        self.module = SegmentAndEmbed(segmenter)  # teacher and student: one pass over both views
        self.dataset = WeakLabelDataset(train.data, train.wesam.weak_labels, train.wesam.n_points, train.seed,
                                        train.on_error)
        self.weights = loss_weights(train)

    def batch(self, samples: list[WeakSample], epoch: int) -> WeSAMBatch:
        return build_wesam_batch(self.segmenter, samples, self.config, self.train.prompts.max_instances,
                                 self.train.seed, epoch)

    def step(
        self,
        model: nn.Module,
        batch: WeSAMBatch,
        optimizer: torch.optim.Optimizer,
        autocast: torch.autocast | None,
        scaler: torch.amp.GradScaler | None,
        step: int,
    ) -> tuple[float, dict[str, float], dict[str, float]]:
        """(loss, step metrics, effective ranks); ``step`` (0-based, global) drives the warm-up."""
        if self.config.warmup_steps:  # from the step count alone, so a resume lands on the same lr
            for group in optimizer.param_groups:
                group["lr"] = self.train.lr * min(1.0, (step + 1) / self.config.warmup_steps)
        terms, ranks = wesam_step(model, self.segmenter, batch, optimizer, self.config, self.weights,
                                  self.train.grad_clip, autocast, scaler)
        return float(terms.total.detach()), terms.metrics, ranks

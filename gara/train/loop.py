"""The Ray Train V2 training loop (one copy runs in every worker).

``train_loop_per_worker(config)`` takes the dict the launcher builds: ``model`` and
``train`` (the params sections, paths already absolute), ``mlflow`` (tracking URI + run id
of the run the driver created, or None) and an optional ``fault_injection`` (tests).

The training method (``train.method``: ``supervised``; ``wesam``, gara/train/wesam.py;
``distill``, gara/train/distill.py) is chosen once and brings its dataset, the module DDP
wraps, batches and step; the rest is shared.
Per worker: frozen base + fresh adapter, DDP over the adapter parameters (gloo on CPU,
NCCL on GPU), a seeded DistributedSampler shard of the training set, Adam, grad clipping,
optional bf16/fp16 autocast (GPU, or bf16 on a CPU that runs it natively). Every epoch:
quick validation on rank 0, then one checkpoint (adapter + optimizer state + counters) via
``ray.train.report``. On start the latest reported checkpoint, if any, is restored, so a
restarted worker group (after a worker died, with ``FailureConfig(max_failures)``) carries on
from the last finished epoch.
Only rank 0 talks to MLflow.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from gara import precision
from gara.allocator import keep_freed_memory
from gara.config import ModelConfig, TrainConfig
from gara.data.dataset import InstanceDataset, collate_samples
from gara.models.adapter_io import load_adapter_weights, save_adapter
from gara.models.adapters.gara import effective_ranks
from gara.models.factory import build_segmenter
from gara.models.segmenter import Segmenter
from gara.seeding import derive_seed
from gara.train.batches import TrainBatch, build_batch
from gara.train.distill import Distill
from gara.train.losses import LossTerms, LossWeights, loss_weights, segmentation_loss
from gara.train.optim import apply_gradients
from gara.train.validation import quick_validation, validation_indices
from gara.train.wesam import WeSAM

ADAPTER_DIR = "adapter"  # inside a Ray checkpoint
STATE_FILE = "train_state.pt"  # optimizer state + counters, loaded with weights_only=True
FLUSH_EVERY = 20  # buffered MLflow step metrics are written in batches (one DB transaction)


def block_name(layer: str) -> str:
    """'image_encoder.blocks.3.attn.qkv' -> 'blocks.3' (a short, MLflow-safe metric suffix)."""
    name = layer.removeprefix("image_encoder.")
    for suffix in (".attn.qkv", ".qkv"):
        name = name.removesuffix(suffix)
    return name


def autocast_for(device: torch.device, train: TrainConfig) -> torch.autocast | None:
    """Autocast for ``train.mixed_precision`` where the device runs it natively (GPU, or a CPU
    with native bf16: see gara.precision), else None (float32)."""
    ctx = precision.autocast(device, train.mixed_precision)
    return ctx if isinstance(ctx, torch.autocast) else None


def train_step(
    model: torch.nn.Module,
    segmenter: Segmenter,
    batch: TrainBatch,
    optimizer: torch.optim.Optimizer,
    weights: LossWeights,
    grad_clip: float | None,
    autocast: torch.autocast | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[LossTerms, dict[str, float]]:
    """One optimisation step. ``model`` is the (possibly DDP-wrapped) ``segmenter``.

    Returns the loss terms and the mean effective rank per GaRA layer for this batch.
    """
    with precision.or_nothing(autocast):
        out = model(batch.images, batch.prompts)
    terms = segmentation_loss(out.low_res_logits, out.iou_predictions, batch.targets, batch.regions, weights)
    loss = terms.total if batch.has_instances else terms.total * 0.0
    apply_gradients(loss, optimizer, grad_clip, scaler)
    ranks = {k: float(v.mean()) for k, v in effective_ranks(segmenter, batch.num_images).items()}
    return terms, ranks


class Supervised:
    """GaRA's recipe as a training method of this loop: GT masks give prompts and targets;
    20 focal + dice + IoU MSE. (WeSAM, its sibling, lives in gara/train/wesam.py.)"""

    def __init__(self, train: TrainConfig, segmenter: Segmenter):
        self.train, self.segmenter = train, segmenter
        self.module = segmenter  # what DDP wraps
        self.dataset = InstanceDataset(train.data, on_error=train.on_error)
        self.weights = loss_weights(train)

    def batch(self, samples: list, epoch: int) -> TrainBatch:
        return build_batch(self.segmenter, samples, self.train.prompts, self.train.seed, epoch)

    def step(
        self,
        model: torch.nn.Module,
        batch: TrainBatch,
        optimizer: torch.optim.Optimizer,
        autocast: torch.autocast | None,
        scaler: torch.amp.GradScaler | None,
        step: int,
    ) -> tuple[float, dict[str, float], dict[str, float]]:
        """(loss, step metrics, effective ranks)."""
        terms, ranks = train_step(model, self.segmenter, batch, optimizer, self.weights, self.train.grad_clip,
                                  autocast, scaler)
        metrics = {"loss/focal": terms.focal, "loss/dice": terms.dice, "loss/iou_mse": terms.iou_mse,
                   "train_iou": terms.iou}
        return float(terms.total.detach()), metrics, ranks


# train.method -> its class: each brings its dataset, the module DDP wraps, batches and steps.
TRAINING_METHODS: dict[str, type[Supervised | WeSAM | Distill]] = {
    "supervised": Supervised, "wesam": WeSAM, "distill": Distill,
}


def training_method(train: TrainConfig, segmenter: Segmenter) -> Supervised | WeSAM | Distill:
    """The method ``train.method`` names, chosen once (every method shares the rest of the loop)."""
    return TRAINING_METHODS[train.method](train, segmenter)


@dataclass
class TrainState:
    """What a checkpoint restores besides the adapter."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps so far (MLflow step axis)
    resumed_from: int | None = None


class StepLogger:
    """Rank 0's MLflow writer: buffered step metrics, written in batches into the driver's run."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        self.run_id = run_id
        self._buffer: list[Any] = []
        if tracking_uri and run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._buffer) >= FLUSH_EVERY * 8:
            self.flush()

    def flush(self) -> None:
        if self.client is not None and self._buffer:
            # log_batch takes at most 1000 metrics per call.
            for i in range(0, len(self._buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000])
            self._buffer.clear()


def _restore(checkpoint: Any, segmenter: Segmenter) -> tuple[TrainState, dict | None]:
    if checkpoint is None:
        return TrainState(), None
    with checkpoint.as_directory() as directory:
        load_adapter_weights(segmenter, Path(directory) / ADAPTER_DIR)
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    epoch, step = int(state["epoch"]), int(state["step"])
    return TrainState(epoch, step, resumed_from=epoch), state


def _maybe_inject_fault(fault: dict | None, rank: int, epoch: int, step_in_epoch: int) -> None:
    """Test hook: SIGKILL this worker once (a marker file makes it fire only once)."""
    if not fault or rank != fault["rank"] or epoch != fault["epoch"]:
        return
    if step_in_epoch < fault.get("after_steps", 1):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at epoch {epoch} step {step_in_epoch}\n", encoding="utf-8")
    # Ray V2 collects reports by polling workers (~every 2 s): a worker that dies sooner after
    # a report can take that epoch's checkpoint with it. wait_s makes the test deterministic.
    time.sleep(float(fault.get("wait_s", 0)))
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class EpochStats:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    ranks: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def _console(message: str) -> None:
    # sys.__stdout__: Ray Train patches print() and would tee each line twice to the driver.
    print(f"[gara train] {message}", file=sys.__stdout__, flush=True)


def _quiet(message: str) -> None:
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    keep_freed_memory()  # each Ray worker is its own process
    model_cfg = ModelConfig.model_validate(config["model"])
    train = TrainConfig.model_validate(config["train"])
    mlflow_cfg = config.get("mlflow") or {}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = _console if rank == 0 else _quiet

    # Same adapter init on every rank (DDP also broadcasts rank 0's parameters).
    torch.manual_seed(derive_seed("adapter-init", train.seed))
    segmenter = build_segmenter(model_cfg)
    state, saved = _restore(ray.train.get_checkpoint(), segmenter)
    device = ray.train.torch.get_device()
    method = training_method(train, segmenter)
    model = ray.train.torch.prepare_model(
        method.module,
        # Buffers belong to the frozen base (eval-mode BatchNorm): no per-step sync needed.
        parallel_strategy_kwargs={"forward_sync_buffers": False, "find_unused_parameters": False},
    )
    segmenter = segmenter.to(device)  # prepare_model moved it; keep the unwrapped handle
    params = [p for p in segmenter.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model.adapter: the segmenter has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    autocast = autocast_for(device, train)
    fp16 = autocast is not None and train.mixed_precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None  # bf16 needs no loss scaling
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        log(f"resumed from checkpoint: {state.epoch} epoch(s), step {state.step}")

    dataset = method.dataset
    if len(dataset) == 0:
        raise ValueError(f"train.data {train.data}: no usable samples")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=train.seed)
    loader = DataLoader(dataset, batch_size=train.batch_size, sampler=sampler, collate_fn=collate_samples,
                        num_workers=train.loader_workers)
    steps_per_epoch = len(loader) if train.max_steps_per_epoch is None else min(
        len(loader), train.max_steps_per_epoch)

    logger = StepLogger(mlflow_cfg.get("tracking_uri"), mlflow_cfg.get("run_id")) if rank == 0 else None
    val_set, val_idx = None, []
    if rank == 0:
        val_set = InstanceDataset(train.val_data, on_error=train.on_error)
        val_idx = validation_indices(val_set, train.val_max_images, train.seed)
        if state.resumed_from is not None:
            logger.log({"resumed_from_epoch": state.resumed_from}, state.step)
    log(f"{world} worker(s), {len(dataset)} images, {steps_per_epoch} steps/epoch, "
        f"batch {train.batch_size}/worker, device {device}, method {train.method}")

    model.train()
    for epoch in range(state.epoch, train.epochs):
        sampler.set_epoch(epoch)  # a new, seeded shuffle every epoch (same on every rank)
        torch.manual_seed(derive_seed("train", train.seed, rank, epoch))  # Gumbel noise
        stats = EpochStats()
        window_start, window_images = time.perf_counter(), 0
        for i, samples in enumerate(loader):
            if i >= steps_per_epoch:
                break
            _maybe_inject_fault(config.get("fault_injection"), rank, epoch, i)
            t0 = time.perf_counter()
            batch = method.batch(samples, epoch)
            loss, step_metrics, ranks = method.step(model, batch, optimizer, autocast, scaler, state.step)
            stats.seconds += time.perf_counter() - t0
            stats.steps += 1
            stats.images += len(samples)
            stats.loss_sum += loss
            window_images += len(samples)
            for layer, value in ranks.items():
                stats.ranks[layer].append(value)
            state.step += 1
            if rank == 0 and (state.step % train.log_every_n_steps == 0 or i + 1 == steps_per_epoch):
                elapsed = time.perf_counter() - window_start
                sps = window_images * world / max(elapsed, 1e-9)  # equal shards: rank 0 x world
                logger.log({
                    "loss": loss,
                    **step_metrics,  # the method's loss terms (supervised: focal, dice, iou_mse)
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": sps,
                }, state.step)
                log(f"epoch {epoch + 1}/{train.epochs} step {state.step} ({i + 1}/{steps_per_epoch}) "
                    f"loss {loss:.4f} {sps:.1f} samples/s")
                window_start, window_images = time.perf_counter(), 0
        state.epoch = epoch + 1
        _end_of_epoch(train, segmenter, optimizer, scaler, state, stats, world, rank, val_set, val_idx,
                      autocast, logger, log)
    if logger is not None:
        logger.flush()


def _end_of_epoch(
    train: TrainConfig,
    segmenter: Segmenter,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    stats: EpochStats,
    world: int,
    rank: int,
    val_set: InstanceDataset | None,
    val_idx: list[int],
    autocast: torch.autocast | None,
    logger: StepLogger | None,
    log: Callable[[str], None],
) -> None:
    """Validate (rank 0), log the epoch, and report one checkpoint (all ranks: report is a barrier)."""
    import ray.train

    metrics: dict[str, float] = {
        "epoch": state.epoch,
        "step": state.step,
        "epoch_loss": stats.loss_sum / max(stats.steps, 1),
        "samples_per_s": stats.images * world / max(stats.seconds, 1e-9),
        "start_epoch": state.resumed_from if state.resumed_from is not None else 0,
    }
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    val = quick_validation(segmenter, val_set, val_idx, train.prompts.max_instances, autocast)
    metrics["val_iou"] = val.iou
    epoch_metrics = {"val_iou": val.iou, "epoch": state.epoch, "epoch_loss": metrics["epoch_loss"],
                     "epoch_samples_per_s": metrics["samples_per_s"]}
    if stats.ranks:
        per_block = {f"effective_rank/{block_name(k)}": sum(v) / len(v) for k, v in stats.ranks.items()}
        per_block["effective_rank/mean"] = sum(per_block.values()) / len(per_block)
        epoch_metrics.update(per_block)
        metrics["effective_rank_mean"] = per_block["effective_rank/mean"]
    if val.effective_rank is not None:
        epoch_metrics["val_effective_rank/mean"] = val.effective_rank
    logger.log(epoch_metrics, state.step)
    logger.flush()  # before the checkpoint: a worker killed later loses no finished epoch
    log(f"epoch {state.epoch}/{train.epochs} done: loss {metrics['epoch_loss']:.4f}, "
        f"val IoU {val.iou:.1f} on {val.images} images, {metrics['samples_per_s']:.1f} samples/s")
    with tempfile.TemporaryDirectory(prefix="gara-ckpt-") as tmp:
        save_adapter(segmenter, Path(tmp) / ADAPTER_DIR)
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": state.epoch,
            "step": state.step,
        }, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

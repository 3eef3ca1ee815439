"""Typed parameters: params.yaml + --set overrides -> pydantic models -> functions.

The defaults below are the single definition of every default; params.yaml spells the same
values out for DVC and for editing (tests/test_config.py keeps the two equal). They are sized
for the CPU main job (`make run`); a GPU run raises the budget in params.yaml (README).
One loader (``load_params``) serves every command; a bad value or an unknown key fails at
load time with the file, the dotted key and the value, on one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gara.models.adapters.config import AdapterConfig

PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A parameter file or override is invalid; the message names the key and the value."""


class ModelConfig(BaseModel):
    """The ``model`` section: which base, where its weights are, which adapter."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "lite_medsam"
    # Path or s3:// URL of the base weights; None = the backbone's packaged weights.
    checkpoint: str | None = None
    checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    s3_endpoint_url: str | None = None
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)


class CorruptConfig(BaseModel):
    """The ``corrupt`` section (gara corrupt; names and levels are checked by gara.data.corruptions)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    types: list[str] | None = None  # None = all 17
    severities: list[int] | None = None  # None = 1..5
    train_variants_per_image: int | None = Field(2, ge=1)  # drawn per image; None = the full grid
    # Evaluation split: N per image dealt out so every type appears equally often (balanced);
    # None = the full grid.
    val_variants_per_image: int | None = Field(3, ge=1)
    # Ray actors that corrupt the images (the cluster: train.ray_address, RAY_ADDRESS, else a
    # local one); 0 = a process pool on this machine. Same bytes either way.
    ray_workers: int = Field(0, ge=0)


class PromptConfig(BaseModel):
    """How prompts are drawn from ground-truth masks (training and evaluation alike)."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[Literal["box", "point"]] = Field(default_factory=lambda: ["box", "point"])
    n_points: int = Field(3, ge=1)  # positive points per instance for a point prompt
    max_instances: int = Field(8, ge=1)  # instances per image per step (training)


class WeSAMConfig(BaseModel):
    """The ``train.wesam`` section: weakly supervised self-training (shared/methods/wesam.md).

    Prompts come from weak labels only (gara/data/weak_labels.py), never from masks. Each loss
    term has a weight; 0 (or ``false``) switches it off, so the paper's ablation is three
    overrides. Instances per image per step: ``train.prompts.max_instances``.
    """

    model_config = ConfigDict(extra="forbid")

    # One kind drawn per image per step: box (the annotation's bbox), point (n_points positive
    # + n_points negative clicks), polygon (the box around a coarse polygon).
    weak_labels: list[Literal["box", "point", "polygon"]] = Field(
        default_factory=lambda: ["box"], min_length=1)
    n_points: int = Field(5, ge=1)
    self_training: float = Field(1.0, ge=0)  # 20 focal + dice + IoU MSE to the teacher's pseudo-labels
    anchor: float = Field(1.0, ge=0)  # dice to the frozen base's masks, through student and teacher
    contrastive: float = Field(1.0, ge=0)  # per-instance InfoNCE, teacher vs anchor prototypes
    tau: float = Field(0.3, gt=0)  # InfoNCE temperature
    warmup_steps: int = Field(0, ge=0)  # linear lr warm-up (paper: 250)

    @model_validator(mode="after")
    def _some_loss(self) -> WeSAMConfig:
        if not (self.self_training or self.anchor or self.contrastive):
            raise ValueError("self_training, anchor and contrastive are all 0: nothing to train")
        return self


class DistillConfig(BaseModel):
    """The ``train.distill`` section: label-free robustification (gara/train/distill.py).

    The teacher is the frozen base on a clean image, the student the adapted model on a
    corrupted copy of it (or on the clean image itself, so Clear is kept); prompts are random
    boxes or clicks, so no annotation is read. Each term's weight may be 0 (off); every term is 0 when
    the student answers exactly as the teacher.
    """

    model_config = ConfigDict(extra="forbid")

    # One kind drawn per image per step: box (random boxes), point (one random click each).
    # LiteMedSAM answers to boxes only; SAM and SAM 2.1 take both.
    prompts: list[Literal["box", "point"]] = Field(default_factory=lambda: ["box"], min_length=1)
    prompts_per_image: int = Field(4, ge=1)  # random prompts per image per step (the labelled sets: ~4)
    min_box_fraction: float = Field(0.1, gt=0, le=1)  # box sides as fractions of the image's
    max_box_fraction: float = Field(0.7, gt=0, le=1)
    kl: float = Field(1.0, ge=0)  # per-pixel Bernoulli KL(teacher || student), mean
    dice: float = Field(1.0, ge=0)  # 1 - soft dice (squared denominators) of the probabilities
    iou: float = Field(1.0, ge=0)  # MSE of the predicted IoU to the teacher's
    feature: float = Field(0.0, ge=0)  # MSE of the student's image embedding to the teacher's

    @model_validator(mode="after")
    def _valid(self) -> DistillConfig:
        if self.min_box_fraction > self.max_box_fraction:
            raise ValueError(f"min_box_fraction {self.min_box_fraction} > max_box_fraction "
                             f"{self.max_box_fraction}")
        if not (self.kl or self.dice or self.iou or self.feature):
            raise ValueError("kl, dice, iou and feature are all 0: nothing to train")
        return self


class MlflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Default: a local SQLite store at the repository root (made absolute at load time so
    # Ray workers and DVC's temp copies write to the same place).
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "gara-sam"


class TrainConfig(BaseModel):
    """The ``train`` section (Ray Train + MLflow)."""

    model_config = ConfigDict(extra="forbid")

    # supervised: GT masks -> prompts and targets (GaRA's recipe); wesam: weak labels only,
    # self-training with an anchor (train.wesam); distill: no labels, the frozen base on the
    # clean source teaches the adapted model on its corrupted copy (train.distill).
    method: Literal["supervised", "wesam", "distill"] = "supervised"
    data: str = "artifacts/corrupted/train"
    val_data: str = "artifacts/corrupted/val"
    out: str = "artifacts/adapter"
    seed: int = 0
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(2, ge=1)  # images per worker per step
    max_steps_per_epoch: int | None = Field(12, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    focal_weight: float = Field(20.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    iou_weight: float = Field(1.0, ge=0)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    val_max_images: int = Field(8, ge=1)  # per-epoch validation subset (clean + corrupted)
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    # Autocast where the hardware runs it natively: GPUs, and bf16 on CPUs with AVX512-BF16/AMX
    # (gara/precision.py); float32 elsewhere.
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    # The Ray cluster of every command that uses Ray (gara/cluster.py); None: RAY_ADDRESS, else a
    # local Ray on 127.0.0.1.
    ray_address: str | None = None
    storage_path: str = "artifacts/ray"  # local folder or s3:// URL for checkpoints
    max_failures: int = Field(2, ge=0)
    on_error: Literal["fail", "skip"] = "fail"  # bad samples: refuse the dataset, or skip + log
    log_every_n_steps: int = Field(1, ge=1)  # per-step metrics (MLflow) and console progress
    checkpoints_to_keep: int = Field(2, ge=1)  # Ray keeps the latest N epoch checkpoints
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per Ray worker (0: in-process)
    object_store_mb: int = Field(256, ge=75)  # object store of a local Ray we start (Ray: >= 75)
    wesam: WeSAMConfig = Field(default_factory=WeSAMConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


class BootstrapConfig(BaseModel):
    """Paired intervals over source images (gara/evaluate/paired.py); the gate uses them too."""

    model_config = ConfigDict(extra="forbid")

    resamples: int = Field(2000, ge=2000)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    seed: int = 0


class EvaluateConfig(BaseModel):
    """The ``evaluate`` section."""

    model_config = ConfigDict(extra="forbid")

    data: str = "artifacts/corrupted/val"
    out: str = "reports/eval"
    seed: int = 0
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    max_images: int | None = Field(None, ge=1)  # source images (each with all its variants)
    types: list[str] | None = None  # corruption subset (None = all present in the data)
    severities: list[int] | None = None
    overlay_images: int = Field(4, ge=0)
    # As train.mixed_precision: bf16 autocast where native (halves LiteMedSAM's CPU time).
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    batch_size: int = Field(4, ge=1)  # images per encoder forward (every model shares the batch)
    # Ray actors that score shards of the images (the cluster as for corrupt.ray_workers); 0 = in
    # this process. The records equal an in-process run's with one torch thread, an actor's share.
    ray_workers: int = Field(0, ge=0)
    use_gpu: bool = False  # models on a GPU (one per Ray actor)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)


class GateConfig(BaseModel):
    """When a challenger earns ``champion``, decided on paired intervals over source images
    (gara/evaluate/paired.py) against the incumbent on the same evaluation set: the gate
    metric's interval must lie above ``margin`` and the Clear interval above
    ``-max_clear_drop``. Metrics are paths into a report's summary."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("degrade.box.iou", pattern=r"^(clear|degrade)\.(box|point)\.(iou|dice)$")
    margin: float = Field(0.0, ge=0)  # points (0-100) the interval's lower end must exceed
    clear_metric: str = Field("clear.box.iou", pattern=r"^clear\.(box|point)\.(iou|dice)$")
    max_clear_drop: float = Field(1.0, ge=0)  # points the Clear interval's lower end may lie below 0


class RegistryConfig(BaseModel):
    """The ``registry`` section (gara register / promote; tracking store: train.mlflow)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("gara-sam", pattern=r"^[A-Za-z0-9_.-]+$")
    candidate: str | None = None  # the report row to register (None: the report's primary model)
    base_row: str = "base"  # the report row of the frozen base (a first champion must beat it)
    # Where pullers find the base's bytes, when the checkpoint trained on is a local path: an
    # s3:// URL (or pkg://PACKAGE/FILE) holding the same bytes (its sha256 is checked at load).
    base_uri: str | None = Field(None, pattern=r"^(s3|pkg)://[^/]+/.+")
    gate: GateConfig = Field(default_factory=GateConfig)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corrupt: CorruptConfig = Field(default_factory=CorruptConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key {key}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params tree once; every problem named on one line (key, message, value)."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``--set dotted.key=value`` items -> overrides; values are YAML scalars (3e-4 -> float,
    true -> bool, null -> None, [q,v] -> list)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.lr=3e-4")
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not YAML: {exc}".splitlines()[0]) from None
    return overrides


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """The one loader every command uses: a params file, then dotted-key overrides (``--set``
    and command options), validated once.

    ``path`` None: ``params.yaml`` in the current directory when there is one, else the
    defaults above. A file that is named and missing is an error, never silently the defaults.
    """
    if path is None:
        path = PARAMS_FILE if PARAMS_FILE.is_file() else None
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path, source = Path(path), str(path)
        if not path.is_file():
            raise ConfigError(f"params file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        check_key(dotted)
        set_dotted(raw, dotted, value)
    if overrides:
        source += " + overrides"
    return parse_params(raw, source)


def check_key(dotted: str) -> None:
    """Refuse an override whose key names no parameter, before anything runs (a typo such as
    ``trian.lr`` must not train on defaults), listing the keys that exist at that level."""
    section: type[BaseModel] = Params
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        fields = section.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"--set {dotted}: unknown key {part!r} in {where} (known: {', '.join(fields)})")
        annotation = fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            if depth < len(parts) - 1:
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            return
        section = annotation


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[leaf] = value

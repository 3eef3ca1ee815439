"""Evaluate named segmenters on a dataset folder: per-instance IoU / Dice for each prompt kind.

Works on any dataset folder in the project's format. Images tagged by ``gara corrupt``
carry ``corruption`` / ``severity`` / ``source_image_id``; an untagged image counts as clean
(its own source, severity 0).

Per batch of images: prompts are drawn ONCE per image and prompt kind from the ground
truth (:func:`gara.data.prompts.prompts_from_masks`, seeded by the source annotation id)
and the very same objects go to every model; each model encodes the batch once and
decodes every prompt kind from those embeddings. A model that altered the prompts it was
given (in place) is caught before the next model sees them.

In process (:func:`evaluate_models`) or on Ray actors (:func:`evaluate_on_ray`,
``evaluate.ray_workers``): the driver selects the images and cuts them into shards of whole
batches; each actor builds every model once and scores the shards it gets; the parts merge in
selection order. Same batches, same prompts: the records equal an in-process run's with the
same number of torch threads per process (an actor has one).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from gara import precision
from gara.allocator import keep_freed_memory
from gara.cluster import RayWorkers, map_on_actors
from gara.config import ConfigError, EvaluateConfig, ModelConfig
from gara.data.coco import read_coco
from gara.data.corrupt import CLEAN
from gara.data.dataset import InstanceDataset, Sample
from gara.data.prompts import PromptKind, prompts_from_masks
from gara.data.storage import inside
from gara.evaluate.metrics import instance_scores
from gara.models.adapter_io import CONFIG_FILE, load_adapted_segmenter, read_manifest
from gara.models.adapters.gara import GaRALinear, effective_ranks
from gara.models.factory import build_segmenter
from gara.models.segmenter import Prompts, Segmenter
from gara.models.stages import frozen_prefix_length, run_stages
from gara.seeding import seeded_rng
from gara.tracking import absolute_tracking_uri, active_store, redact_uri, resolve_tracking_uri

log = logging.getLogger(__name__)

RECORD_COLUMNS = [
    "model", "image_id", "source_image_id", "corruption", "severity", "kind",
    "ann_id", "source_ann_id", "iou", "dice", "predicted_iou", "effective_rank",
]
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class ModelSpecError(ValueError):
    """A ``--model`` spec names nothing loadable; the message names the spec."""


# --- which images ------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """One dataset image and its corruption tags (untagged = clean, severity 0)."""

    index: int  # position in the InstanceDataset
    image_id: int
    source_image_id: int
    corruption: str
    severity: int

    @property
    def is_clean(self) -> bool:
        return self.corruption == CLEAN


def image_infos(dataset: InstanceDataset, coco: dict[str, Any]) -> list[ImageInfo]:
    """Tags of every loadable image of ``dataset`` (``coco``: its annotations.json)."""
    entries = {e["id"]: e for e in coco["images"] if isinstance(e, dict) and "id" in e}
    infos = []
    for index, image_id in enumerate(dataset.image_ids):
        entry = entries[image_id]
        corruption = str(entry.get("corruption") or CLEAN)
        severity = entry.get("severity", 0 if corruption == CLEAN else None)
        if not isinstance(severity, int) or isinstance(severity, bool):
            raise ValueError(
                f"{dataset.root / 'annotations.json'}: image {image_id} has corruption "
                f"{corruption!r} but severity {severity!r}; expected an integer"
            )
        source = entry.get("source_image_id", image_id)
        infos.append(ImageInfo(index, int(image_id), int(source), corruption, int(severity)))
    return infos


def select_images(
    infos: Sequence[ImageInfo],
    max_images: int | None = None,
    types: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    seed: int = 0,
    where: str = "dataset",
) -> list[ImageInfo]:
    """Subset by corruption type and severity, then by source image.

    Clean images are always kept (they give the Clear column); ``types`` / ``severities``
    filter the corrupted variants and must exist in the data. ``max_images`` counts source
    images, each kept with all its selected variants; the choice is drawn from ``seed``
    (deterministic, and spread over the dataset rather than its first files).
    """
    present_types = sorted({i.corruption for i in infos if not i.is_clean})
    present_sev = sorted({i.severity for i in infos if not i.is_clean})
    if types is not None:
        missing = [t for t in types if t not in present_types and t != CLEAN]
        if missing:
            raise ValueError(
                f"evaluate.types: {missing} not in {where} (its corruption types: "
                f"{present_types or 'none, every image is clean'})"
            )
    if severities is not None:
        missing_sev = [s for s in severities if s not in present_sev]
        if missing_sev:
            raise ValueError(
                f"evaluate.severities: {missing_sev} not in {where} (its severities: "
                f"{present_sev or 'none, every image is clean'})"
            )
    kept = [
        i for i in infos
        if i.is_clean or (
            (types is None or i.corruption in types) and (severities is None or i.severity in severities)
        )
    ]
    sources = sorted({i.source_image_id for i in kept})
    if max_images is not None and max_images < len(sources):
        rng = seeded_rng("evaluate-images", seed)
        chosen = set(rng.choice(sources, size=max_images, replace=False).tolist())
        kept = [i for i in kept if i.source_image_id in chosen]
    # Variants of one source side by side: the overlay rows and progress read naturally.
    return sorted(
        kept, key=lambda i: (i.source_image_id, not i.is_clean, i.corruption, i.severity, i.image_id)
    )


def overlay_choice(images: Sequence[ImageInfo], n_sources: int) -> list[ImageInfo]:
    """Images for the overlay grid: for the first ``n_sources`` sources, the clean image and
    one corrupted variant (types taken in turn, the highest selected severity)."""
    by_source: dict[int, list[ImageInfo]] = {}
    for info in images:
        by_source.setdefault(info.source_image_id, []).append(info)
    types = sorted({i.corruption for i in images if not i.is_clean})
    chosen: list[ImageInfo] = []
    for n, source in enumerate(sorted(by_source)[:n_sources]):
        variants = by_source[source]
        chosen += [i for i in variants if i.is_clean][:1]
        if types:
            wanted = types[n % len(types)]
            pool = [i for i in variants if i.corruption == wanted] or [i for i in variants if not i.is_clean]
            if pool:
                chosen.append(max(pool, key=lambda i: (i.severity, i.image_id)))
    return chosen


# --- models ------------------------------------------------------------------------------

_NAMED = re.compile(r"^([A-Za-z0-9_.@+-]+)=(.+)$")


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """``name=target`` -> (name, target); a bare target -> (None, target)."""
    match = _NAMED.match(spec.strip())
    if match:
        return match.group(1), match.group(2)
    return None, spec.strip()


def find_adapter_dir(root: Path, spec: str) -> Path:
    """The one folder under ``root`` (itself included) that holds adapter.json."""
    found = sorted({p.parent for p in root.rglob(CONFIG_FILE)}, key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise ModelSpecError(f"--model {spec!r}: no {CONFIG_FILE} anywhere under {root}; not an adapter")
    if len(found) > 1:
        listed = ", ".join(str(p.relative_to(root)) for p in found[:5])
        raise ModelSpecError(f"--model {spec!r}: several adapters under {root} ({listed}); name one folder")
    return found[0]


def _load_adapter(folder: Path, model_config: ModelConfig) -> Segmenter:
    manifest = read_manifest(folder)
    # The configured base wins where it is the same backbone (a checkpoint path recorded on
    # another machine may not exist here); the manifest's sha256 still has to match.
    same = manifest.backbone == model_config.backbone
    checkpoint = model_config.checkpoint if same else None
    return load_adapted_segmenter(folder, checkpoint=checkpoint, s3_endpoint_url=model_config.s3_endpoint_url)


def _download_mlflow(uri: str, spec: str, dst: Path, tracking_uri: str | None) -> Path:
    import mlflow  # lazy: heavy, and only this branch needs it
    from mlflow.exceptions import MlflowException

    uri_to_use = resolve_tracking_uri(tracking_uri)
    # models:/ URIs resolve through nested lookups that read MLflow's global store: set it too.
    store = active_store(uri_to_use) if uri_to_use else contextlib.nullcontext()
    try:
        with store:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=uri_to_use, registry_uri=uri_to_use,
            )
    except MlflowException as exc:
        where = redact_uri(uri_to_use)
        raise ModelSpecError(f"--model {spec!r}: MLflow ({where}) cannot give {uri}: {exc}") from exc
    return Path(local)


def _no_such_model(spec: str, path: Path) -> ModelSpecError:
    return ModelSpecError(f"--model {spec!r}: {path} does not exist (expected 'base', an adapter folder, "
                          "or an MLflow URI models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...)")


def resolve_model(
    spec: str, model_config: ModelConfig, tracking_uri: str | None = None
) -> tuple[str, Segmenter]:
    """A ``--model`` spec -> (report name, segmenter in eval mode).

    ``base``: the frozen backbone of ``model_config`` (no adapter); a path: an adapter folder
    (or a folder holding exactly one); ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/ID/PATH``: MLflow artifacts (tracking URI: ``MLFLOW_TRACKING_URI``, else
    ``tracking_uri``) searched for the folder with adapter.json. ``name=...`` names it.
    """
    name, target = parse_model_spec(spec)
    if not target:
        raise ModelSpecError(f"--model {spec!r}: empty model spec")
    if target == "base":
        segmenter = build_segmenter(model_config, with_adapter=False)
        default = "base"
    elif target.startswith(MLFLOW_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="gara-eval-model-") as tmp:
            local = _download_mlflow(target, spec, Path(tmp), tracking_uri)
            # Weights are read into memory here, so the download can go right after.
            segmenter = _load_adapter(find_adapter_dir(local, spec), model_config)
        default = target.split(":/", 1)[1].strip("/")
        if target.startswith("runs:/"):
            default = f"run-{default.split('/')[0][:8]}"
    elif "://" in target:
        raise ModelSpecError(
            f"--model {spec!r}: unsupported URI; use base, an adapter folder, models:/NAME@ALIAS, "
            "models:/NAME/VERSION or runs:/RUN_ID/PATH"
        )
    else:
        path = Path(target)
        if not path.exists():
            raise _no_such_model(spec, path)
        folder = path.parent if path.is_file() and path.name == CONFIG_FILE else path
        if not folder.is_dir():
            raise ModelSpecError(f"--model {spec!r}: {path} is a file, not an adapter folder")
        segmenter = _load_adapter(find_adapter_dir(folder, spec), model_config)
        default = path.resolve().name if path.is_dir() else path.resolve().parent.name
    segmenter.eval()
    return name or default, segmenter


def resolve_models(
    specs: Sequence[str], model_config: ModelConfig, tracking_uri: str | None = None
) -> dict[str, Segmenter]:
    """Several specs -> {name: segmenter}, in the given order (the last one is primary)."""
    if not specs:
        raise ModelSpecError("give at least one --model (base, an adapter folder, or models:/...)")
    models: dict[str, Segmenter] = {}
    for spec in specs:
        name, segmenter = resolve_model(spec, model_config, tracking_uri)
        if name in models:
            raise ModelSpecError(f"--model {spec!r}: the name {name!r} is already taken; use NAME=SPEC")
        models[name] = segmenter
    return models


# --- evaluation --------------------------------------------------------------------------


@dataclass
class Overlay:
    """What the overlay grid shows for one image: GT, the prompts, each model's masks."""

    info: ImageInfo
    image: np.ndarray
    gt: np.ndarray  # (K, H, W) bool
    kind: str
    prompts: Prompts
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # model -> (K, H, W) bool


@dataclass
class EvaluationResult:
    records: pd.DataFrame  # one row per (model, image, instance, prompt kind): RECORD_COLUMNS
    models: list[str]  # in the order given; the last is the primary (candidate) model
    dataset: str
    kinds: list[str]
    n_points: int
    seed: int
    images: list[ImageInfo]  # evaluated (selected, with at least one instance)
    skipped: list[ImageInfo]  # selected but without instances: nothing to prompt
    prompts: dict[int, dict[str, Prompts]]  # image id -> kind -> the prompts every model got
    overlays: list[Overlay]
    seconds: float
    gara_models: list[str] = field(default_factory=list)
    evaluation_set: str = ""  # fingerprint of images + labels + prompt settings (evaluation_set_id)
    # Distinct source images by their entry's "source" tag (the embedded sample: "photo" for a
    # real labelled photo, "composite" for a copy-paste image; "untagged" otherwise).
    source_kinds: dict[str, int] = field(default_factory=dict)
    adapter_weights: dict[str, str | None] = field(default_factory=dict)  # model -> weights sha256

    @property
    def primary(self) -> str:
        return self.models[-1]


def _fingerprint(prompts: Prompts) -> str:
    digest = hashlib.sha256()
    for t in (prompts.boxes, prompts.points, prompts.labels):
        digest.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def evaluation_set_id(
    data: Path, coco: dict[str, Any], images: Sequence[ImageInfo], kinds: Sequence[str], n_points: int,
    seed: int,
) -> str:
    """A fingerprint of what was evaluated: the labels, every evaluated image's bytes and the
    prompt settings. Two reports with the same id scored models on the very same inputs, so
    their numbers are comparable (the registry's promotion gate relies on it)."""
    digest = hashlib.sha256()
    digest.update((data / "annotations.json").read_bytes())
    files = {e["id"]: e["file_name"] for e in coco["images"] if isinstance(e, dict) and "id" in e}
    for info in sorted(images, key=lambda i: i.image_id):
        digest.update(f"{info.image_id}:".encode())
        digest.update(hashlib.sha256(inside(data, files[info.image_id]).read_bytes()).digest())
    digest.update(repr((sorted(kinds), n_points, seed)).encode())
    return digest.hexdigest()[:16]


def source_kinds(coco: dict[str, Any], images: Sequence[ImageInfo]) -> dict[str, int]:
    """How many distinct source images of each ``source`` tag were evaluated."""
    tags = {e["id"]: str(e.get("source") or "untagged") for e in coco["images"] if isinstance(e, dict)}
    first = {i.source_image_id: i.image_id for i in images}  # variants share their source's tag
    counts: dict[str, int] = {}
    for image_id in first.values():
        counts[tags[image_id]] = counts.get(tags[image_id], 0) + 1
    return dict(sorted(counts.items()))


def has_gara(model: torch.nn.Module) -> bool:
    return any(isinstance(m, GaRALinear) for m in model.modules())


def _chunks(items: Sequence[ImageInfo], size: int) -> Iterator[list[ImageInfo]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@dataclass
class _Selection:
    """What to evaluate, decided once in the driver: every image, in order, and which are drawn."""

    data: Path
    dataset: InstanceDataset
    coco: dict[str, Any]
    images: list[ImageInfo]
    kinds: list[PromptKind]
    overlay_kind: str
    overlay_ids: set[int]


def _select(data: Path, config: EvaluateConfig) -> _Selection:
    dataset, coco = InstanceDataset(data), read_coco(data)
    selected = select_images(
        image_infos(dataset, coco), config.max_images, config.types, config.severities, config.seed, str(data)
    )
    if not selected:
        raise ValueError(f"evaluate: no images selected from {data}")
    kinds: list[PromptKind] = list(dict.fromkeys(config.prompts.kinds))
    overlay_kind = "box" if "box" in kinds else kinds[0]
    overlay_ids = {i.image_id for i in overlay_choice(selected, config.overlay_images)}
    return _Selection(data, dataset, coco, selected, kinds, overlay_kind, overlay_ids)


@dataclass
class _Scored:
    """What a run of images gives (the whole selection in process, a shard on a Ray actor)."""

    models: list[str]
    gara_models: list[str]
    adapter_weights: dict[str, str | None]
    records: list[dict[str, Any]] = field(default_factory=list)
    prompts: dict[int, dict[str, Prompts]] = field(default_factory=dict)
    overlays: dict[int, Overlay] = field(default_factory=dict)
    evaluated: list[ImageInfo] = field(default_factory=list)
    skipped: list[ImageInfo] = field(default_factory=list)


class _Scorer:
    """The models and the dataset (loaded and validated once per process: the selection's in
    process, an actor's own on Ray), ready to score runs of images in batches of
    ``config.batch_size``."""

    def __init__(self, models: Mapping[str, Segmenter], dataset: InstanceDataset, coco: dict[str, Any],
                 config: EvaluateConfig):
        if not models:
            raise ValueError("evaluate: no models given")
        self.models, self.config, self.dataset = models, config, dataset
        self.source_ann = {
            a["id"]: a.get("source_annotation_id", a["id"])
            for a in coco["annotations"] if isinstance(a, dict)
        }
        self.gara_models = [name for name, m in models.items() if has_gara(m)]
        for model in models.values():
            model.eval()

    @torch.no_grad()
    def score(self, images: Sequence[ImageInfo], kinds: Sequence[PromptKind], overlay_kind: str,
              overlay_ids: set[int], after_batch: Callable[[int], None] = lambda n: None) -> _Scored:
        config = self.config
        weights = {name: getattr(m, "adapter_weights_sha256", None) for name, m in self.models.items()}
        scored = _Scored(list(self.models), self.gara_models, weights)
        for chunk in _chunks(images, config.batch_size):
            batch: list[tuple[ImageInfo, Sample, list[Any]]] = []
            for info in chunk:
                sample = self.dataset[info.index]
                if len(sample["masks"]) == 0:
                    scored.skipped.append(info)
                    continue
                # Seeded by the source annotation: an instance gets the same points in every variant.
                keys = [self.source_ann[int(a)] for a in sample["ann_ids"]]
                batch.append((info, sample, keys))
            for info, sample, keys in batch:
                scored.prompts[info.image_id] = {
                    k: prompts_from_masks(sample["masks"], k, config.prompts.n_points, config.seed, keys)
                    for k in kinds
                }
                if info.image_id in overlay_ids:
                    shown = scored.prompts[info.image_id][overlay_kind]
                    scored.overlays[info.image_id] = Overlay(
                        info, sample["image"], sample["masks"], overlay_kind, shown
                    )
            if batch:
                scored.records += _evaluate_batch(
                    self.models, batch, scored.prompts, kinds, scored.overlays, self.gara_models,
                    config.mixed_precision,
                )
                scored.evaluated += [info for info, _, _ in batch]
            after_batch(len(chunk))
        return scored


def _result(selection: _Selection, parts: Sequence[_Scored], config: EvaluateConfig, start: float
            ) -> EvaluationResult:
    """Merge scored runs (in selection order) into one EvaluationResult."""
    first = parts[0]
    for part in parts[1:]:  # e.g. an alias moved between two Ray actors' downloads
        if (part.models, part.adapter_weights) != (first.models, first.adapter_weights):
            raise RuntimeError(
                f"evaluate: the workers loaded different models ({first.adapter_weights} vs "
                f"{part.adapter_weights}); did a registry alias move during the run? Evaluate again"
            )
    records = [r for part in parts for r in part.records]
    evaluated = [i for part in parts for i in part.evaluated]
    skipped = [i for part in parts for i in part.skipped]
    prompts = {k: v for part in parts for k, v in part.prompts.items()}
    overlays = {k: v for part in parts for k, v in part.overlays.items()}
    for info in skipped:
        log.warning("image %s (%s s%s) has no instances: nothing to prompt, left out",
                    info.image_id, info.corruption, info.severity)
    data, kinds = selection.data, selection.kinds
    return EvaluationResult(
        records=pd.DataFrame.from_records(records, columns=RECORD_COLUMNS), models=list(first.models),
        dataset=str(data), kinds=list(kinds), n_points=config.prompts.n_points, seed=config.seed,
        images=evaluated, skipped=skipped, prompts=prompts,
        overlays=[overlays[i.image_id] for i in selection.images if i.image_id in overlays],
        seconds=time.perf_counter() - start, gara_models=list(first.gara_models),
        evaluation_set=evaluation_set_id(data, selection.coco, evaluated, kinds, config.prompts.n_points,
                                         config.seed),
        source_kinds=source_kinds(selection.coco, evaluated),
        adapter_weights=dict(first.adapter_weights),
    )


def evaluate_models(
    models: Mapping[str, Segmenter],
    data: str | Path,
    config: EvaluateConfig,
    progress: bool = True,
) -> EvaluationResult:
    """Every model on the selected images of ``data``, in this process (see the module docstring)."""
    start = time.perf_counter()
    selection = _select(Path(data), config)
    scorer = _Scorer(on_device(models, config.use_gpu), selection.dataset, selection.coco, config)
    bar = tqdm(total=len(selection.images), desc="evaluate", unit="img", disable=not progress)
    try:
        scored = scorer.score(selection.images, selection.kinds, selection.overlay_kind,
                              selection.overlay_ids, bar.update)
    finally:
        bar.close()
    return _result(selection, [scored], config, start)


def on_device(models: Mapping[str, Segmenter], use_gpu: bool) -> Mapping[str, Segmenter]:
    """The models on this process's GPU when ``use_gpu`` (evaluate.use_gpu), else as they are."""
    if not use_gpu:
        return models
    if not torch.cuda.is_available():
        raise ConfigError("evaluate.use_gpu: true, but torch sees no CUDA device here; set it to false")
    return {name: model.to("cuda") for name, model in models.items()}


# --- on a Ray cluster --------------------------------------------------------------------

# Shards per Ray worker: several, so a slow worker is balanced out and a killed one costs little.
SHARDS_PER_WORKER = 4


@dataclass(frozen=True)
class _Shard:
    index: int
    images: list[ImageInfo]
    kinds: list[PromptKind]
    overlay_kind: str
    overlay_ids: frozenset[int]


def plan_shards(images: Sequence[ImageInfo], batch_size: int, workers: int) -> list[list[ImageInfo]]:
    """Contiguous runs of whole batches, in selection order (so a source's variants stay
    together): every image is scored in the very batch it has in process, which keeps the
    numbers bit for bit those of an in-process run."""
    batches = list(_chunks(images, batch_size))
    per_shard = -(-len(batches) // max(1, min(len(batches), workers * SHARDS_PER_WORKER)))
    return [[i for b in batches[k : k + per_shard] for i in b] for k in range(0, len(batches), per_shard)]


class _RayEvaluator:
    """A Ray actor: builds every model once (from the specs, as ``gara evaluate`` does), then
    scores the shards it is given. ``fault`` (tests): on shard ``fault["shard"]``, after its first
    batch, the process SIGKILLs itself once (the ``fault["marker"]`` file says it did)."""

    def __init__(self, specs: Sequence[str], model_config: ModelConfig, tracking_uri: str | None, data: str,
                 config: EvaluateConfig, fault: dict[str, Any] | None = None):
        keep_freed_memory()  # each actor is its own process (gara/allocator.py)
        self.fault, self.error = fault, None
        try:
            models = resolve_models(specs, model_config, tracking_uri)
            self.scorer = _Scorer(on_device(models, config.use_gpu), InstanceDataset(data), read_coco(data),
                                  config)
        except Exception as exc:  # noqa: BLE001 - raised by score(): as itself, and never retried
            self.error = exc

    def score(self, shard: _Shard) -> _Scored:
        if self.error is not None:
            raise self.error

        def after_batch(_: int) -> None:
            if self.fault and shard.index == self.fault["shard"]:
                marker = Path(self.fault["marker"])
                if not marker.exists():
                    marker.write_text(f"killed pid {os.getpid()} in shard {shard.index}\n")
                    os.kill(os.getpid(), signal.SIGKILL)

        return self.scorer.score(shard.images, shard.kinds, shard.overlay_kind, set(shard.overlay_ids),
                                 after_batch)


def _portable_spec(spec: str) -> str:
    """A ``--model`` spec that means the same in a Ray worker's working directory; a folder that
    is not there fails here, before any worker starts."""
    name, target = parse_model_spec(spec)
    if target == "base" or "://" in target or target.startswith(MLFLOW_SCHEMES):
        return spec
    path = Path(target).absolute()
    if not path.exists():
        raise _no_such_model(spec, path)
    return f"{name}={path}" if name else str(path)


def evaluate_on_ray(
    specs: Sequence[str],
    model_config: ModelConfig,
    tracking_uri: str | None,
    data: str | Path,
    config: EvaluateConfig,
    ray_workers: RayWorkers,
    progress: bool = True,
    fault: dict[str, Any] | None = None,
) -> EvaluationResult:
    """:func:`evaluate_models` on ``ray_workers.count`` Ray actors: the selection is made here,
    cut into shards (:func:`plan_shards`), scored by actors that each build every model once,
    and merged in selection order, so records, metrics and report equal those of an in-process
    run with one torch thread (an actor's share; more threads round float sums differently).
    A worker killed mid-shard is restarted and that shard scored again; a shard counts once."""
    start = time.perf_counter()
    if not specs:
        raise ModelSpecError("give at least one --model (base, an adapter folder, or models:/...)")
    portable = [_portable_spec(s) for s in specs]
    selection = _select(Path(data), config)
    if model_config.checkpoint and "://" not in model_config.checkpoint:
        local = str(Path(model_config.checkpoint).absolute())
        model_config = model_config.model_copy(update={"checkpoint": local})
    # The configured URI, made absolute; MLFLOW_TRACKING_URI (which may hold credentials) is never
    # passed on: each worker reads its own environment.
    configured = absolute_tracking_uri(tracking_uri, Path.cwd()) if tracking_uri else None
    overlay_ids = frozenset(selection.overlay_ids)
    shards = [_Shard(k, images, selection.kinds, selection.overlay_kind, overlay_ids)
              for k, images in enumerate(plan_shards(selection.images, config.batch_size, ray_workers.count))]
    init = (portable, model_config, configured, str(Path(data).absolute()), config, fault)
    bar = tqdm(total=len(selection.images), desc=f"evaluate (Ray x{ray_workers.count})", unit="img",
               disable=not progress)
    try:
        with ray_workers.session():
            parts = map_on_actors(_RayEvaluator, init, ray_workers.count, "score", shards,
                                  on_result=lambda p: bar.update(len(p.evaluated) + len(p.skipped)),
                                  num_gpus=1 if config.use_gpu else 0)
    finally:
        bar.close()
    return _result(selection, parts, config, start)


class SharedPrefixes:
    """Encodes a batch for several models, running the frozen encoder prefix they share once.

    Models with the same base (:meth:`Segmenter.shared_base_key`) compute identical values up
    to the first stage any of them adapts (:mod:`gara.models.stages`); that prefix runs once
    per batch and every model continues from it. Exact: the same operations on the same
    inputs under the same autocast, so each model's embeddings are bit for bit what its own
    ``encode`` gives.
    """

    def __init__(self, models: Mapping[str, Segmenter], mixed_precision: precision.MixedPrecision):
        self.models, self.mixed_precision = models, mixed_precision
        groups: dict[Any, list[str]] = {}
        for name, model in models.items():
            groups.setdefault(model.shared_base_key() or ("alone", name), []).append(name)
        shared = {key: names for key, names in groups.items() if len(names) > 1}
        self.group_of = {name: key for key, names in shared.items() for name in names}
        self.stages = {name: models[name].encoder_stages() for name in self.group_of}
        # The shared length of a group: up to the first stage that any member adapts.
        self.length = {key: min(frozen_prefix_length(self.stages[n]) for n in names)
                       for key, names in shared.items()}
        self.cache: dict[Any, torch.Tensor] = {}

    def encode(self, name: str, batch: torch.Tensor) -> torch.Tensor:
        model = self.models[name]
        with precision.autocast(model.device, self.mixed_precision):
            if name not in self.group_of:  # shares nothing: its own encode
                return model.encode(batch)
            key, stages = self.group_of[name], self.stages[name]
            if key not in self.cache:
                self.cache[key] = run_stages(stages, batch, stop=self.length[key])
            return run_stages(stages, self.cache[key], start=self.length[key])


def _evaluate_batch(
    models: Mapping[str, Segmenter],
    batch: list[tuple[ImageInfo, Sample, list[Any]]],
    prompts: dict[int, dict[str, Prompts]],
    kinds: Sequence[str],
    overlays: dict[int, Overlay],
    gara_models: Sequence[str],
    mixed_precision: precision.MixedPrecision = "no",
) -> list[dict[str, Any]]:
    images = [sample["image"] for _, sample, _ in batch]
    given = {k: [prompts[info.image_id][k] for info, _, _ in batch] for k in kinds}
    expected = {k: [_fingerprint(p) for p in given[k]] for k in kinds}
    preprocessed: dict[Any, Any] = {}  # models sharing a transform share the preprocessed batch
    prefixes = SharedPrefixes(models, mixed_precision)
    records: list[dict[str, Any]] = []
    for name, model in models.items():
        key = (model.transform, str(model.device))
        if key not in preprocessed:
            preprocessed[key] = model.preprocess(images)
        tensor, metas = preprocessed[key]
        amp = precision.autocast(model.device, mixed_precision)
        embeddings = prefixes.encode(name, tensor)
        ranks: list[float] = [float("nan")] * len(batch)
        if name in gara_models:  # read right after the encoder: it is what set the gates
            per_layer = effective_ranks(model, len(batch))
            ranks = torch.stack(list(per_layer.values())).mean(0).tolist()
        for kind in kinds:
            for i, p in enumerate(given[kind]):
                if p is not prompts[batch[i][0].image_id][kind] or _fingerprint(p) != expected[kind][i]:
                    raise RuntimeError(
                        f"prompts for image {batch[i][0].image_id} ({kind}) changed before model "
                        f"{name!r}: every model must get the same prompts"
                    )
            inputs = [model.prompts_to_input(p, m) for p, m in zip(given[kind], metas, strict=True)]
            with amp:
                out = model.decode(embeddings, inputs)
                logits = model.masks_at_input_resolution(out, metas)
            for (info, sample, keys), lg, pred_iou, rank in zip(
                batch, logits, out.iou_predictions, ranks, strict=True
            ):
                pred = (lg > 0).cpu()
                iou, dice = instance_scores(pred, sample["masks"])
                if info.image_id in overlays and kind == overlays[info.image_id].kind:
                    overlays[info.image_id].predictions[name] = pred.numpy()
                for k, (ann_id, source_ann_id) in enumerate(zip(sample["ann_ids"], keys, strict=True)):
                    records.append({
                        "model": name, "image_id": info.image_id, "source_image_id": info.source_image_id,
                        "corruption": info.corruption, "severity": info.severity, "kind": kind,
                        "ann_id": int(ann_id), "source_ann_id": source_ann_id, "iou": float(iou[k]),
                        "dice": float(dice[k]), "predicted_iou": float(pred_iou[k, 0].float()) * 100.0,
                        "effective_rank": rank,
                    })
    # A model that edited the prompts in place would skew every later model: refuse it.
    for kind in kinds:
        for (info, _, _), p, fp in zip(batch, given[kind], expected[kind], strict=True):
            if _fingerprint(p) != fp:
                raise RuntimeError(
                    f"prompts for image {info.image_id} ({kind}) were changed by a model: every model "
                    "must get the same prompts"
                )
    return records

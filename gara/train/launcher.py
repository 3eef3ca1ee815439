"""`gara train` from the driver's side: MLflow run, Ray cluster, TorchTrainer, adapter out.

``train(params)``:
  1. makes every path absolute (Ray workers run in other working directories): data,
     val_data, out, storage_path (unless a URL), a local base checkpoint and a relative
     ``sqlite:///`` tracking URI (relative to the current directory, the repo root when run
     by make / DVC);
  2. creates the MLflow run (params = flattened model + train config; lineage tags);
  3. joins or starts Ray (:mod:`gara.cluster`: ``train.ray_address``, RAY_ADDRESS, else a
     local cluster on 127.0.0.1, shut down after), and runs a ``TorchTrainer`` with a unique
     run name (a reused name would silently restore old checkpoints);
  4. copies the latest checkpoint's adapter to ``train.out`` (built in a sibling temp folder,
     swapped in only when complete), logs it as the run's ``adapter/`` artifacts, tags the run
     with the weights' sha256 (how ``gara register`` finds it) and ends the run FINISHED
     (FAILED if anything raised; the error propagates).

``train.out`` holds only the adapter (weights + manifest): the same training gives the same
bytes, so DVC's lock does not change when a run is repeated; the run id is in MLflow and printed.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gara.cluster import ray_session
from gara.config import Params
from gara.data.coco import ANNOTATIONS_FILE, DatasetFormatError, annotations_path, is_image_folder, read_coco
from gara.data.validate import DatasetValidationError, validate_dataset
from gara.data.weak_labels import WeakLabelDataset
from gara.models.backbones import get_backbone_spec
from gara.models.checkpoints import CheckpointError, resolve_checkpoint
from gara.models.manifest import read_manifest
from gara.tracking import (
    ADAPTER_WEIGHTS_TAG,
    ensure_experiment,
    flatten_tree,
    redact_uri,
    require_reachable,
    resolve_tracking_uri,
)
from gara.train.lineage import corruption_set, dvc_data_hash, git_commit, project_root
from gara.train.loop import ADAPTER_DIR, train_loop_per_worker


@dataclass
class TrainResult:
    adapter_dir: Path
    run_id: str
    metrics: dict[str, Any]
    tracking_uri: str  # the store the run is in (MLFLOW_TRACKING_URI wins over params)


def _is_url(value: str) -> bool:
    return "://" in value


def resolve_paths(params: Params, base: Path | None = None) -> Params:
    """A copy of ``params`` with the paths workers need made absolute."""
    base = (base or Path.cwd()).resolve()
    params = params.model_copy(deep=True)
    train, model = params.train, params.model
    train.data = str((base / train.data).resolve())
    train.val_data = str((base / train.val_data).resolve())
    train.out = str((base / train.out).resolve())
    if not _is_url(train.storage_path):
        train.storage_path = str((base / train.storage_path).resolve())
    if model.checkpoint and not _is_url(model.checkpoint):
        model.checkpoint = str((base / model.checkpoint).resolve())
    train.mlflow.tracking_uri = resolve_tracking_uri(train.mlflow.tracking_uri, base)
    return params


def run_params(params: Params) -> dict[str, str]:
    sections = {"model": params.model.model_dump(mode="json"), "train": params.train.model_dump(mode="json")}
    flat = {key: str(value) for key, value in flatten_tree(sections).items()}
    flat.pop("train.mlflow.tracking_uri", None)  # may carry credentials
    return flat


def base_checkpoint(params: Params) -> tuple[str, str]:
    """(URI, sha256) of the base weights the workers will load; fails early on a bad one."""
    model = params.model
    spec = get_backbone_spec(model.backbone)
    uri, expected = model.checkpoint, model.checkpoint_sha256
    if uri is None:
        if spec.default_checkpoint is None:
            raise CheckpointError(
                f"model.checkpoint: backbone {model.backbone!r} has no packaged weights; set it to "
                "a local path or s3:// URL of the base checkpoint")
        uri, expected = spec.default_checkpoint(), expected or spec.default_sha256
    _, sha = resolve_checkpoint(uri, expected, model.s3_endpoint_url)
    return str(uri), sha


def lineage_tags(params: Params, root: Path, ray_run_name: str) -> dict[str, str]:
    uri, sha = base_checkpoint(params)
    data_hash, data_hash_source = dvc_data_hash(params.train.data, root)
    return {
        "git_commit": git_commit(root),
        "dvc_data_hash": data_hash,
        "dvc_data_hash_source": data_hash_source,
        "base_checkpoint": uri,
        "base_checkpoint_sha256": sha,
        "corruption_set": corruption_set(params.train.data),
        "backbone": params.model.backbone,
        "adapter_kind": params.model.adapter.kind,
        "train_method": params.train.method,
        "train_data": params.train.data,
        "ray_run_name": ray_run_name,
    }


def _create_run(params: Params, tags: dict[str, str], run_name: str):
    from mlflow import MlflowClient
    from mlflow.entities import Param

    cfg = params.train.mlflow
    client = MlflowClient(cfg.tracking_uri)
    experiment_id = ensure_experiment(client, cfg.experiment, cfg.tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = [Param(k, v) for k, v in sorted(run_params(params).items())]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return client, run.info.run_id


def _swap_in(src: Path, out: Path) -> None:
    """Copy ``src`` into a sibling temp folder, then swap it in for ``out``.

    ``out`` never holds a half-written adapter: it is the old one or the new one (between
    the two renames it briefly does not exist).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    try:
        shutil.copytree(src, tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_data(params: Params) -> None:
    """Fail in the driver, before a run or a cluster exists, on a missing dataset folder, a
    dataset the rules refuse (train.on_error fail; with skip, the workers skip), or on
    training data the method cannot learn from (labels for supervised and WeSAM, clean/corrupted
    pairs for distill)."""
    train = params.train
    corrupt_first = (f"`gara corrupt --data {train.data} --out PAIRS`, then train.data=PAIRS with "
                     "train.method=distill")
    for key in ("data", "val_data"):
        folder = getattr(train, key)
        if not annotations_path(folder).is_file():
            hint = f": a plain folder of images (unlabelled); run {corrupt_first}" if (
                key == "data" and is_image_folder(folder)) else ""
            raise DatasetFormatError(f"train.{key} = {folder}: no {ANNOTATIONS_FILE} there{hint}")
        if train.on_error != "fail":
            continue
        # The dataset rules, one line each, before any worker starts. WeSAM's training set may hold
        # boxes without masks: its weak-label rules are checked instead (no image decoded).
        if key == "data" and train.method == "wesam":
            WeakLabelDataset(folder, train.wesam.weak_labels, train.wesam.n_points, train.seed, "fail")
            continue
        problems = validate_dataset(folder)
        if problems:
            raise DatasetValidationError(folder, problems)
    coco = read_coco(train.data)
    if train.method == "distill":
        if not any(isinstance(e, dict) and "source_image_id" in e for e in coco["images"]):
            raise DatasetFormatError(f"train.data = {train.data}: no clean/corrupted pairs (image entries "
                                     f"with source_image_id) for train.method distill; run {corrupt_first}")
    elif not coco["annotations"]:
        raise DatasetFormatError(f"train.data = {train.data}: no annotations (an unlabelled set), but "
                                 f"train.method {train.method} learns from labels; use train.method=distill")


def train(params: Params, extra_loop_config: dict[str, Any] | None = None) -> TrainResult:
    """Train an adapter as ``params`` says; see the module docstring.

    ``extra_loop_config`` is merged into the worker config (tests: ``fault_injection``).
    """
    root = project_root()
    params = resolve_paths(params)
    # Preflight, before a run or a cluster exists: the server (seconds, not minutes of MLflow's
    # retries), then the data.
    require_reachable(params.train.mlflow.tracking_uri)
    check_data(params)
    train_cfg = params.train
    run_name = f"gara-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    tags = lineage_tags(params, root, run_name)
    client, run_id = _create_run(params, tags, run_name)
    tracking_uri = train_cfg.mlflow.tracking_uri
    print(f"[gara train] MLflow run {run_id} ({redact_uri(tracking_uri)}), Ray run {run_name}", flush=True)
    try:
        with ray_session(train_cfg.ray_address, max(2, train_cfg.num_workers), train_cfg.object_store_mb):
            result = _fit(params, run_name, tracking_uri, run_id, extra_loop_config or {})
            if result.checkpoint is None:
                raise RuntimeError(f"Ray run {run_name} finished without a checkpoint")
            metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)}
            out = Path(train_cfg.out)
            with result.checkpoint.as_directory() as directory:
                adapter = Path(directory) / ADAPTER_DIR
                client.log_artifacts(run_id, str(adapter), "adapter")
                _swap_in(adapter, out)
        client.set_tag(run_id, ADAPTER_WEIGHTS_TAG, read_manifest(out).weights_sha256)
    except BaseException as exc:
        client.set_terminated(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return TrainResult(out, run_id, metrics, tracking_uri)


def _fit(params: Params, run_name: str, tracking_uri: str, run_id: str, extra: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train_cfg = params.train
    loop_config = {
        "model": params.model.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json"),
        "mlflow": {"tracking_uri": tracking_uri, "run_id": run_id},
        **extra,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=train_cfg.use_gpu,
            resources_per_worker=None if train_cfg.use_gpu else {"CPU": 1},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=train_cfg.storage_path,
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.checkpoints_to_keep),
        ),
    )
    return trainer.fit()

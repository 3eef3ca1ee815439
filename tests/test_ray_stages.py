"""`gara corrupt` and `gara evaluate` on a real local Ray cluster (127.0.0.1): the same bytes and
the same records as in one process, local folders and s3:// datasets, a killed worker's shard
scored again and counted once, and a worker's error raised as itself."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gara.cli import app
from gara.cluster import RayWorkers
from gara.config import EvaluateConfig, ModelConfig, load_params
from gara.data.corrupt import corrupt_dataset
from gara.evaluate.report import evaluate_to_report
from gara.evaluate.runner import ModelSpecError, evaluate_models, evaluate_on_ray, plan_shards, resolve_models
from gara.models.adapter_io import save_adapter
from gara.models.factory import build_segmenter
from tests.conftest import write_dataset

WORKERS = RayWorkers(2, None, 100)  # joins the module's cluster (ray.is_initialized)


@pytest.fixture(scope="module")
def ray_cluster(s3_server) -> Iterator[None]:
    """A local Ray on 127.0.0.1 whose workers see the S3 server's credentials, as a cluster's
    nodes hold theirs in the environment; stopped afterwards."""
    saved = dict(os.environ)
    os.environ.update(s3_server.env())
    os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
             _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 noisy images with two rectangles each, as a dataset folder."""
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(1, 5):
        img = rng.integers(30, 90, size=(64, 80, 3), dtype=np.uint8)
        masks = []
        for x0, y0 in ((6 + i, 8), (40, 30 + i)):
            mask = np.zeros((64, 80), bool)
            mask[y0 : y0 + 20, x0 : x0 + 24] = True
            img[mask] = (220, 60 + 20 * i, 40)
            masks.append(mask)
        pictures.append((img, masks))
    return write_dataset(tmp_path_factory.mktemp("photos"), pictures)


CORRUPT = {"types": ["fog", "gaussian_noise", "motion_blur"], "severities": [1, 3], "variants_per_image": 2}


@pytest.fixture(scope="module")
def corrupted(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """In one process: the reference bytes. 4 sources x (clean + 2 variants) = 12 images."""
    out = tmp_path_factory.mktemp("corrupted-in-process")
    corrupt_dataset(photos, out, workers=1, progress=False, **CORRUPT)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_corrupt_on_two_ray_workers_writes_the_in_process_bytes(ray_cluster, photos, corrupted, tmp_path):
    out = tmp_path / "on-ray"
    summary = corrupt_dataset(photos, out, progress=False, ray_workers=WORKERS, **CORRUPT)
    assert (summary.source_images, summary.images, summary.written) == (4, 12, 12)
    assert _files(out) == _files(corrupted)  # every PNG, every record, annotations.json


def test_corrupt_reads_and_writes_s3_datasets_on_ray(ray_cluster, s3_server, photos, corrupted, tmp_path):
    client, bucket = s3_server.client(), s3_server.new_bucket()
    for name, data in _files(photos).items():
        client.put_object(Bucket=bucket, Key=f"raw/{name}", Body=data)
    params = tmp_path / "params.yaml"
    params.write_text("corrupt:\n  ray_workers: 2\n")
    command = [
        "corrupt", "--data", f"s3://{bucket}/raw", "--out", f"s3://{bucket}/corrupted", "--types",
        ",".join(CORRUPT["types"]), "--severities", "1,3", "--variants-per-image", "2", "--no-progress",
        "--params", str(params),
    ]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "12 images (4 sources)" in result.output and "written 12, skipped 0" in result.output
    again = CliRunner().invoke(app, command)  # the records in the bucket say nothing changed
    assert again.exit_code == 0 and "written 0, skipped 12, removed 0" in again.output, again.output
    listed = client.list_objects_v2(Bucket=bucket, Prefix="corrupted/")["Contents"]
    written = {o["Key"].removeprefix("corrupted/"): client.get_object(Bucket=bucket, Key=o["Key"])["Body"]
               .read() for o in listed}
    assert written == _files(corrupted)


@pytest.fixture(scope="module")
def models(tiny_vit_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelConfig, list[str]]:
    """The frozen base and a GaRA adapter whose weights moved off their init (its masks differ)."""
    config = ModelConfig(backbone="vit_tiny", checkpoint=str(tiny_vit_checkpoint.path))
    torch.manual_seed(1)
    segmenter = build_segmenter(config)
    with torch.no_grad():
        for param in segmenter.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    folder = save_adapter(segmenter, tmp_path_factory.mktemp("adapter") / "gara")
    return config, ["base", f"gara={folder}"]


def _params(tmp: Path, config: ModelConfig, data: Path, ray_workers: int):
    return load_params(None, {
        "model.backbone": config.backbone, "model.checkpoint": config.checkpoint,
        "evaluate.data": str(data), "evaluate.out": str(tmp / f"report-{ray_workers}"),
        "evaluate.batch_size": 1, "evaluate.overlay_images": 2, "evaluate.mixed_precision": "no",
        "evaluate.ray_workers": ray_workers, "train.object_store_mb": 100,
    })


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def test_evaluate_on_two_ray_workers_writes_the_in_process_report(ray_cluster, models, corrupted, tmp_path):
    """Bit for bit, against an in-process run with a Ray actor's one torch thread (CPU float sums
    split across N threads differ in the last bits: README, Evaluation on Ray)."""
    config, specs = models
    reports = {}
    for workers in (0, 2):
        params = _params(tmp_path, config, corrupted, workers)
        with torch_threads(1):
            metrics, result = evaluate_to_report(params, specs, progress=False)
        assert len(result.images) == 12 and result.models == ["base", "gara"]
        reports[workers] = (Path(params.evaluate.out), metrics)
    (in_process, m0), (on_ray, m2) = reports[0], reports[2]
    assert m0["models"]["gara"]["summary"] != m0["models"]["base"]["summary"]  # two different models
    assert m2 == m0
    for name in ("records.csv", "metrics.json", "paired.csv", "report.md"):
        assert (on_ray / name).read_bytes() == (in_process / name).read_bytes(), name


def test_a_killed_worker_has_its_shard_scored_again_and_counted_once(ray_cluster, models, corrupted,
                                                                     tmp_path):
    config, specs = models
    evaluate = EvaluateConfig(batch_size=1, overlay_images=0, mixed_precision="no")
    shards = plan_shards(range(12), 1, WORKERS.count)  # type: ignore[arg-type]
    assert [len(s) for s in shards] == [2] * 6  # so a kill after a shard's first image is mid-shard
    marker = tmp_path / "killed.txt"
    result = evaluate_on_ray(specs, config, None, corrupted, evaluate, WORKERS, progress=False,
                             fault={"shard": 1, "marker": str(marker)})
    assert marker.read_text().startswith("killed pid")
    with torch_threads(1):
        reference = evaluate_models(resolve_models(specs, config), corrupted, evaluate, progress=False)
    keys = ["model", "image_id", "kind", "ann_id"]
    assert not result.records.duplicated(keys).any()
    assert len(result.records) == 2 * 12 * 2 * 2  # models x images x instances x prompt kinds
    assert result.records.equals(reference.records)
    assert [i.image_id for i in result.images] == list(range(1, 13))


def test_a_workers_bad_image_is_named_once_all_are_done_and_a_bad_model_before_any_worker(
        ray_cluster, models, photos, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(photos, broken)
    (broken / "images" / "3.png").write_bytes(b"")  # found by the actor that gets image 3
    with pytest.raises(ValueError, match=r"broken: images/3\.png, image 3: \[unreadable-image\] .*empty$"):
        corrupt_dataset(broken, tmp_path / "out", progress=False, ray_workers=WORKERS, **CORRUPT)
    # reported once every actor is done: the other images' variants are there for a re-run
    records = sorted(p.name for p in (tmp_path / "out" / ".records").rglob("*.json"))
    assert records == ["1.json", "2.json", "4.json"]
    config, _ = models
    with pytest.raises(ModelSpecError, match="no-adapter does not exist"):
        evaluate_on_ray(["base", str(tmp_path / "no-adapter")], config, None, photos, EvaluateConfig(),
                        RayWorkers(2, "ray://unreachable.invalid:10001", 100), progress=False)

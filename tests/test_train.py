"""`gara train`: losses, batches, lineage, and real Ray Train runs tracked in a real MLflow.

The Ray tests share one local cluster (127.0.0.1, 2 CPUs, small object store) for the
module; runs use vit_tiny (random weights saved as a real base checkpoint) on 8 tiny images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gara.config import ModelConfig, PromptConfig, TrainConfig, load_params
from gara.data.coco import mask_bbox, mask_to_rle, write_coco
from gara.data.dataset import InstanceDataset
from gara.models.adapter_io import load_adapted_segmenter, read_manifest
from gara.models.factory import build_segmenter
from gara.models.transforms import ImageTransform
from gara.tracking import ADAPTER_WEIGHTS_TAG, absolute_tracking_uri, redact_uri
from gara.train.batches import build_batch, logits_size
from gara.train.launcher import resolve_paths, run_params
from gara.train.lineage import corruption_set, dvc_data_hash
from gara.train.loop import block_name
from gara.train.losses import (
    dice_loss,
    focal_loss,
    gt_at_logits,
    loss_weights,
    mask_iou,
    segmentation_loss,
    valid_region,
)

REPO = Path(__file__).resolve().parents[1]
CORRUPTIONS = (("fog", 3), ("clean", 0), ("snow", 1))


# --- tiny data -----------------------------------------------------------------------------
def make_dataset(root: Path, n: int, seed: int) -> Path:
    """``n`` images of 64-96 px, each with a bright disc and a bright square on dark noise."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(64, 97, size=2))
        image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:h, :w]
        for k in range(2):
            cy, cx, r = int(rng.integers(15, h - 15)), int(rng.integers(15, w - 15)), int(rng.integers(6, 14))
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if k == 0 else (
                (abs(yy - cy) < r) & (abs(xx - cx) < r))
            image[mask] = rng.integers(150, 256, 3)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": mask_to_rle(mask), "bbox": mask_bbox(mask),
                         "area": float(mask.sum())})
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        corruption, severity = CORRUPTIONS[i % len(CORRUPTIONS)]
        images.append({"id": i + 1, "file_name": f"images/{i}.png", "height": h, "width": w,
                       "corruption": corruption, "severity": severity})
    write_coco(root, {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "blob"}]})
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_vit_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base = tiny_vit_checkpoint.path
    train, val = make_dataset(root / "train", 8, 0), make_dataset(root / "val", 3, 1)
    return {"train": train, "val": val, "base": base}


def tiny_params(tiny: dict[str, Path], tmp: Path, tracking_uri: str, **train: object) -> dict:
    return {
        "model": {"backbone": "vit_tiny", "checkpoint": str(tiny["base"])},
        "train": {
            "data": str(tiny["train"]), "val_data": str(tiny["val"]), "out": str(tmp / "adapter"),
            "storage_path": str(tmp / "ray"), "lr": 1e-3, "batch_size": 4, "val_max_images": 2,
            "num_workers": 1, "epochs": 3, "max_failures": 0,
            "mlflow": {"tracking_uri": tracking_uri, "experiment": f"test-{tmp.name}"},
            **train,
        },
    }


# --- losses and batches (no Ray) ----------------------------------------------------------
def test_losses_are_zero_for_a_perfect_prediction_and_combine_with_the_recipe_weights():
    target = torch.zeros(2, 16, 16)
    target[0, 4:10, 4:12] = 1
    target[1, :3, :] = 1
    perfect = target * 40 - 20
    assert focal_loss(perfect, target) < 1e-6 and dice_loss(perfect, target) < 1e-6
    assert torch.equal(mask_iou(perfect, target), torch.ones(2))
    assert focal_loss(-perfect, target) > 1 and dice_loss(-perfect, target) > 0.9
    logits = torch.randn(2, 1, 16, 16)
    iou_pred = torch.rand(2, 1)
    terms = segmentation_loss([logits], [iou_pred], [target], [(16, 16)], loss_weights(TrainConfig()))
    actual = mask_iou(logits[:, 0], target)
    mse = float(((iou_pred[:, 0] - actual) ** 2).mean())
    assert terms.iou_mse == pytest.approx(mse, rel=1e-5)
    assert float(terms.total) == pytest.approx(20 * terms.focal + terms.dice + mse, rel=1e-5)


def test_ground_truth_is_aligned_with_the_logits_frame():
    transform = ImageTransform(size=256)
    image = np.zeros((90, 150, 3), np.uint8)
    _, meta = transform.preprocess(image)
    mask = np.zeros((1, 90, 150), bool)
    mask[0, 30:70, 60:140] = True
    target = gt_at_logits(mask, meta, transform, 64)
    rows, cols = valid_region(meta, transform, 64)
    assert target.shape == (1, 64, 64) and (rows, cols) == (39, 64)
    assert target[:, rows:].sum() == 0  # padding rows hold no foreground
    # Mapping the target back with the segmenter's own post-processing recovers the mask.
    back = transform.postprocess_masks(target[:, None] * 2 - 1, meta)[:, 0].numpy() > 0
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.9


def test_batches_are_seeded_and_respect_max_instances(tiny):
    seg = build_segmenter(ModelConfig(backbone="vit_tiny"), pretrained=False)
    samples = [InstanceDataset(tiny["train"])[i] for i in range(6)]
    prompts = PromptConfig(kinds=["box", "point"], max_instances=1)
    a = build_batch(seg, samples, prompts, seed=0, epoch=0)
    b = build_batch(seg, samples, prompts, seed=0, epoch=0)
    assert a.kinds == b.kinds and set(a.kinds) == {"box", "point"}
    assert all(torch.equal(x, y) for x, y in zip(a.targets, b.targets, strict=True))
    assert [len(p) for p in a.prompts] == [1] * 6 and a.num_instances == 6
    assert all(t.shape[-1] == logits_size(seg) for t in a.targets)
    kinds_by_epoch = {tuple(build_batch(seg, samples, prompts, seed=0, epoch=e).kinds) for e in range(4)}
    assert len(kinds_by_epoch) > 1  # prompt kinds are redrawn every epoch


def test_lineage_data_hash_prefers_dvc_lock_then_dvc_file_then_annotations(tmp_path):
    data = make_dataset(tmp_path / "data" / "train", 3, 0)
    digest = hashlib.sha256((data / "annotations.json").read_bytes()).hexdigest()
    assert dvc_data_hash(data, tmp_path) == (f"sha256:{digest}", "annotations.json")
    (tmp_path / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "aa11.dir", "path": "data"}]}))
    assert dvc_data_hash(data, tmp_path) == ("aa11.dir", "data.dvc")
    lock = {"schema": "2.0", "stages": {"prep": {"outs": [{"path": "data/train", "md5": "bb22.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert dvc_data_hash(data, tmp_path) == ("bb22.dir", "dvc.lock")
    assert corruption_set(data) == "clean:0,fog:3,snow:1"


def test_paths_and_tracking_uri_become_absolute_and_credentials_are_redacted(tmp_path):
    params = load_params(None, {"train.storage_path": "s3://bucket/ray"})
    resolved = resolve_paths(params, tmp_path)
    assert resolved.train.data == str(tmp_path / "artifacts/corrupted/train")
    assert resolved.train.storage_path == "s3://bucket/ray"
    assert resolved.train.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert redact_uri("https://user:secret@mlflow.example:8443/x") == "https://mlflow.example:8443/x"
    assert "train.mlflow.tracking_uri" not in run_params(resolved)
    assert block_name("image_encoder.layers.1.blocks.0.attn.qkv") == "layers.1.blocks.0"


def test_cli_train_refuses_a_missing_dataset_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from gara.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"data": str(tmp_path / "nope")}}))
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--set", "train.lr=3e-4"])
    # A user error: one line naming the key, exit 2 (no stack trace).
    assert result.exit_code == 2 and "train.data" in result.output
    bad = CliRunner().invoke(app, ["train", "--params", str(params), "--set", "train.lr"])
    assert bad.exit_code == 2 and "expected dotted.key=value" in bad.output
    assert not (tmp_path / "mlflow.db").exists()


# --- real Ray Train runs ------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster on 127.0.0.1 for this module; stopped afterwards."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
             _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def cli_run(ray_cluster, tiny, mlflow_server, tmp_path_factory) -> dict:
    """`gara train` through the CLI: 1 worker, 3 epochs x 2 steps, tracked in the MLflow server."""
    from typer.testing import CliRunner

    from gara.cli import app

    tmp = tmp_path_factory.mktemp("cli-run")
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params(tiny, tmp, mlflow_server)))
    out = tmp / "adapter-out"
    result = CliRunner().invoke(app, ["train", "--params", str(params_file), "--set", "train.lr=1e-3",
                                      "--set", "train.prompts.kinds=[box, point]", "--workers", "1",
                                      "--epochs", "3", "--out", str(out)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    run_id = result.output.split("mlflow run: ")[1].split()[0]
    return {"out": out, "run_id": run_id, "output": result.output, "params": params_file,
            "tracking_uri": mlflow_server}


def _eval_loss(seg, tiny) -> float:
    ds = InstanceDataset(tiny["train"])
    seg.eval()
    with torch.no_grad():
        batch = build_batch(seg, [ds[i] for i in range(len(ds))], PromptConfig(kinds=["box"]), 0, 0)
        out = seg(batch.images, batch.prompts)
        terms = segmentation_loss(out.low_res_logits, out.iou_predictions, batch.targets, batch.regions,
                                  loss_weights(TrainConfig()))
    return float(terms.total)


def test_training_lowers_the_loss_and_writes_a_loadable_adapter(cli_run, tiny):
    out = cli_run["out"]
    assert f"adapter: {out}" in cli_run["output"]
    # Only what training determines: no run id, so a repeated run gives the same bytes (dvc.lock).
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp left
    adapted = load_adapted_segmenter(out)
    base = build_segmenter(ModelConfig(backbone="vit_tiny", checkpoint=str(tiny["base"])), with_adapter=False)
    before, after = _eval_loss(base, tiny), _eval_loss(adapted, tiny)
    assert after < 0.99 * before, (before, after)
    assert f"mlflow run: {cli_run['run_id']} ({cli_run['tracking_uri']})" in cli_run["output"]


def test_mlflow_run_holds_params_metrics_lineage_and_adapter(cli_run, tiny, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(cli_run["run_id"])
    assert run.info.status == "FINISHED"
    # gara register finds the run by the weights it trained
    assert run.data.tags[ADAPTER_WEIGHTS_TAG] == read_manifest(cli_run["out"]).weights_sha256
    p = run.data.params
    assert (p["model.backbone"], p["model.adapter.kind"], p["train.epochs"]) == ("vit_tiny", "gara", "3")
    assert float(p["train.lr"]) == 1e-3 and p["train.prompts.kinds"] == "['box', 'point']"
    assert p["train.focal_weight"] == "20.0" and p["model.adapter.high_rank"] == "256"

    def history(key: str) -> list[float]:
        metrics = client.get_metric_history(run.info.run_id, key)
        return [m.value for m in sorted(metrics, key=lambda m: m.step)]

    assert len(history("loss")) == 6 and all(v > 0 for v in history("loss"))  # 3 epochs x 2 steps
    assert history("lr") == [1e-3] * 6
    for key in ("loss/focal", "loss/dice", "loss/iou_mse", "samples_per_s"):
        assert len(history(key)) == 6, key
    val = history("val_iou")
    assert len(val) == 3 and all(0 <= v <= 100 for v in val)
    for block in range(4):
        ranks = history(f"effective_rank/blocks.{block}")
        assert len(ranks) == 3 and all(0 < r <= 16 + 64 for r in ranks)  # r_L 16 + r_H 64 (capped)
    assert len(history("effective_rank/mean")) == 3

    tags = run.data.tags
    sha = hashlib.sha256(tiny["base"].read_bytes()).hexdigest()
    assert tags["base_checkpoint_sha256"] == sha and tags["base_checkpoint"] == str(tiny["base"])
    assert (tags["backbone"], tags["adapter_kind"]) == ("vit_tiny", "gara")
    assert tags["corruption_set"] == "clean:0,fog:3,snow:1"
    ann = hashlib.sha256((tiny["train"] / "annotations.json").read_bytes()).hexdigest()
    assert tags["dvc_data_hash"] == f"sha256:{ann}"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert tags["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "adapter"))
    assert artifacts == ["adapter/adapter.json", "adapter/adapter.safetensors"]


def test_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, tiny, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from gara.config import parse_params
    from gara.train.launcher import train

    raw = tiny_params(tiny, tmp_path, mlflow_server, num_workers=2, batch_size=2, epochs=2, max_failures=1)
    marker = tmp_path / "killed.txt"
    # Rank 1 SIGKILLs itself after one step of the 2nd epoch (once: the marker file).
    fault = {"fault_injection": {"rank": 1, "epoch": 1, "after_steps": 1, "marker": str(marker),
                                  "wait_s": 5}}
    result = train(parse_params(raw), extra_loop_config=fault)
    assert marker.exists()
    assert result.metrics["epoch"] == 2 and result.metrics["start_epoch"] == 1
    client = MlflowClient(mlflow_server)
    resumed = client.get_metric_history(result.run_id, "resumed_from_epoch")
    assert [m.value for m in resumed] == [1.0]
    epochs = sorted(m.value for m in client.get_metric_history(result.run_id, "epoch"))
    assert epochs == [1.0, 2.0]  # each epoch finished (and was logged) exactly once
    assert client.get_run(result.run_id).info.status == "FINISHED"
    load_adapted_segmenter(result.adapter_dir)


def test_wesam_trains_through_ray_from_boxes_only(ray_cluster, tiny, mlflow_server, tmp_path):
    """train.method=wesam under the same launcher, loop and MLflow run, with a GaRA adapter (the
    paper's LoRA is trained in tests/test_wesam.py): the training data keeps its boxes and loses
    every mask (decoding one would fail the run), the three loss terms are logged, and the
    output is a normal adapter folder."""
    from mlflow import MlflowClient

    from gara.config import parse_params
    from gara.data.coco import read_coco
    from gara.train.launcher import train

    coco = read_coco(tiny["train"])
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    # hard links: a symlink out of the folder is refused by the dataset rules
    shutil.copytree(tiny["train"] / "images", boxes / "images", copy_function=os.link)
    write_coco(boxes, {**coco, "annotations": [{k: v for k, v in a.items() if k != "segmentation"}
                                               for a in coco["annotations"]]})
    raw = tiny_params(tiny, tmp_path, mlflow_server, data=str(boxes), method="wesam", epochs=1,
                      wesam={"weak_labels": ["box"]})
    result = train(parse_params(raw))
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["train_method"] == "wesam"
    assert run.data.params["train.method"] == "wesam" and run.data.params["train.wesam.tau"] == "0.3"
    for key in ("loss", "loss/self", "loss/anchor", "loss/contrast", "pseudo_label_iou"):
        assert len(client.get_metric_history(result.run_id, key)) == 2, key  # 8 images / batch 4
    assert "loss/focal" not in run.data.metrics  # the supervised terms belong to the other method
    assert len(client.get_metric_history(result.run_id, "val_iou")) == 1
    assert read_manifest(result.adapter_dir).adapter.kind == "gara"
    load_adapted_segmenter(result.adapter_dir)

"""SAM 2.1 backbones: the official sam2 package's Hiera models behind our segmenter and adapters.

Unit tests run the tiny test configuration (seeded random weights saved as an official-layout
checkpoint) on CPU. The end-to-end test trains it with Ray, evaluates it, registers it in a real
MLflow server and pulls it in a fresh process, all through the CLI and all on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gara.config import ModelConfig
from gara.errors import ChecksumMismatchError
from gara.models.adapter_io import (
    AdapterFormatError,
    load_adapted_segmenter,
    load_adapter_weights,
    read_manifest,
    save_adapter,
)
from gara.models.adapters.config import AdapterConfig
from gara.models.backbones import build_backbone
from gara.models.checkpoints import CheckpointError
from gara.models.factory import build_segmenter, wrap_backbone
from gara.models.inject import adapter_layers, adapter_state_dict, adapter_tensors, parameter_report
from gara.models.segmenter import Prompts
from gara.registry.register import serving_requirements
from tests.conftest import publish_base
from tests.test_registry import PULL_SCRIPT
from tests.test_train import make_dataset, ray_cluster  # noqa: F401  (a module fixture)

TINY = "sam2.1_hiera_tiny_test"
BOX = [12.0, 10.0, 90.0, 70.0]
POINTS = [[[40.0, 30.0], [85.0, 65.0]]]


class Base(NamedTuple):
    path: Path
    sha256: str


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Base:
    """The tiny configuration's seeded weights as an official SAM 2.1 checkpoint ({"model": ...})."""
    torch.manual_seed(0)
    model = build_backbone(TINY, pretrained=False).model
    path = tmp_path_factory.mktemp("sam21-base") / "sam2.1_hiera_tiny_test.pt"
    torch.save({"model": model.state_dict()}, path)
    return Base(path, hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 80, (90, 120, 3), dtype=np.uint8)
    picture[20:60, 30:80] = rng.integers(150, 256, 3, dtype=np.uint8)
    return picture


def segmenter(base: Base, adapter: AdapterConfig | None = None):
    config = ModelConfig(backbone=TINY, checkpoint=str(base.path), checkpoint_sha256=base.sha256,
                         adapter=adapter or AdapterConfig())
    return build_segmenter(config, with_adapter=adapter is not None).eval()


def logits_and_iou(seg, image: np.ndarray, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
    batch, metas = seg.preprocess([image])
    out = seg(batch, [seg.prompts_to_input(prompts, metas[0])])
    return seg.masks_at_input_resolution(out, metas)[0], out.iou_predictions[0]


# --- the model: what the official predictor computes, loaded safely ------------------------
def official_predictor(backbone):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(backbone.model)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # its 1024 px sizes, at the test's 256
    return predictor


PROMPTS = {  # name -> (boxes, points, labels) for the predictor; one object per box / point set
    "box": (np.array([BOX]), None, None),
    "two boxes": (np.array([BOX, [0.0, 40.0, 70.0, 90.0]]), None, None),
    "box+points": (np.array([BOX]), np.array(POINTS), np.array([[1, 0]])),
    "points": (None, np.array(POINTS), np.array([[1, 0]])),
}


def as_prompts(boxes, points, labels) -> Prompts:
    tensor = (lambda a: None if a is None else torch.from_numpy(a))  # noqa: E731
    return Prompts(boxes=tensor(boxes), points=tensor(points), labels=tensor(labels))


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_segmenter_computes_what_the_official_image_predictor_computes(tiny_base, image, prompt):
    backbone = build_backbone(TINY, checkpoint=str(tiny_base.path), checkpoint_sha256=tiny_base.sha256)
    seg = wrap_backbone(backbone).eval()
    boxes, points, labels = PROMPTS[prompt]
    predictor = official_predictor(backbone)
    predictor.set_image(image)
    expected, expected_iou, _ = predictor.predict(point_coords=points, point_labels=labels, box=boxes,
                                                  multimask_output=False, return_logits=True)
    with torch.no_grad():
        logits, iou = logits_and_iou(seg, image, as_prompts(boxes, points, labels))
    k = len(boxes if boxes is not None else points)
    assert logits.shape == (k, 90, 120)
    np.testing.assert_allclose(logits.numpy(), expected.reshape(k, 90, 120), atol=1e-4)
    np.testing.assert_allclose(iou[:, 0].numpy(), expected_iou.reshape(k), atol=1e-5)


def test_a_batch_of_images_gets_each_image_s_own_answer(tiny_base, image):
    """Two images of different shapes in one batch: each decodes from its own slice of the
    packed embeddings, as the predictor answers each image alone."""
    backbone = build_backbone(TINY, checkpoint=str(tiny_base.path), checkpoint_sha256=tiny_base.sha256)
    seg = wrap_backbone(backbone).eval()
    other = np.ascontiguousarray(np.flip(image, axis=1)[:70])
    asked = [PROMPTS["two boxes"], PROMPTS["box+points"]]
    with torch.no_grad():
        batch, metas = seg.preprocess([image, other])
        out = seg(batch, [seg.prompts_to_input(as_prompts(*p), m) for p, m in zip(asked, metas, strict=True)])
        logits = seg.masks_at_input_resolution(out, metas)
    predictor = official_predictor(backbone)
    for picture, (boxes, points, labels), got in zip([image, other], asked, logits, strict=True):
        predictor.set_image(picture)
        expected, _, _ = predictor.predict(point_coords=points, point_labels=labels, box=boxes,
                                           multimask_output=False, return_logits=True)
        np.testing.assert_allclose(got.numpy(), expected.reshape(got.shape), atol=1e-4)


def test_checkpoints_load_by_sha256_and_a_wrong_one_is_refused(tiny_base, tmp_path):
    loaded = build_backbone(TINY, checkpoint=str(tiny_base.path), checkpoint_sha256=tiny_base.sha256)
    assert loaded.checkpoint_sha256 == tiny_base.sha256
    with pytest.raises(ChecksumMismatchError, match="sha256 is"):
        build_backbone(TINY, checkpoint=str(tiny_base.path), checkpoint_sha256="0" * 64)
    sam1 = tmp_path / "sam_vit_tiny.pth"
    torch.save(build_backbone("vit_tiny", pretrained=False).model.state_dict(), sam1)
    with pytest.raises(CheckpointError, match=f"does not fit backbone '{TINY}'"):
        build_backbone(TINY, checkpoint=str(sam1))
    with pytest.raises(CheckpointError, match="has no packaged weights"):
        build_backbone("sam2.1_hiera_b+")


# --- adapters on the Hiera blocks ---------------------------------------------------------
ADAPTERS = {
    "gara": AdapterConfig(kind="gara", low_rank=4, high_rank=8),
    "lora": AdapterConfig(kind="lora", rank=4),
    "adaptformer": AdapterConfig(kind="adaptformer", rank=4),
    "gara+cobot": AdapterConfig(kind="gara", low_rank=4, high_rank=8, cobot=True),
    "lora+cobot": AdapterConfig(kind="lora", rank=4, cobot=True),
    "adaptformer+cobot": AdapterConfig(kind="adaptformer", rank=4, cobot=True),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_every_adapter_kind_starts_at_the_frozen_model_and_trains_only_its_own_parameters(
    tiny_base, image, name
):
    prompts = Prompts(boxes=torch.tensor([BOX, [0.0, 0.0, 120.0, 90.0]]))
    frozen = segmenter(tiny_base)
    adapted = segmenter(tiny_base, ADAPTERS[name])
    # Every block of the tiny Hiera is adapted, the 3 that change width (and pool) included.
    assert [int(n.split(".")[3]) for n in adapter_layers(adapted)] == [0, 1, 2, 3, 4]
    widening = [b.dim != b.dim_out for b in adapted.image_encoder.trunk.blocks]
    assert widening == [False, True, True, False, True]
    with torch.no_grad():
        base_logits, base_iou = logits_and_iou(frozen, image, prompts)
        logits, iou = logits_and_iou(adapted, image, prompts)
    assert torch.equal(logits, base_logits) and torch.equal(iou, base_iou)

    adapted.train()
    logits, iou = logits_and_iou(adapted, image, prompts)
    (logits.sigmoid().mean() + iou.sum()).backward()
    own = {id(p) for _, _, p in adapter_tensors(adapted)}
    with_grad = [n for n, p in adapted.named_parameters() if p.grad is not None]
    assert with_grad and all(id(p) in own for n, p in adapted.named_parameters() if p.grad is not None)
    assert all(not p.requires_grad for p in adapted.parameters() if id(p) not in own)
    assert any(float(p.grad.abs().sum()) > 0 for p in adapted.parameters() if p.grad is not None)


def test_adapters_save_and_load_bit_for_bit(tiny_base, image, tmp_path):
    adapted = segmenter(tiny_base, ADAPTERS["gara"])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_state_dict(adapted).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = save_adapter(adapted, tmp_path / "adapter")
    assert read_manifest(folder).backbone == TINY
    loaded = load_adapted_segmenter(folder)
    for (key, saved), (key2, back) in zip(adapter_state_dict(adapted).items(),
                                          adapter_state_dict(loaded).items(), strict=True):
        assert key == key2 and torch.equal(saved, back)
    prompts = Prompts(boxes=torch.tensor([BOX]))
    with torch.no_grad():
        before, after = logits_and_iou(adapted, image, prompts), logits_and_iou(loaded, image, prompts)
        frozen, _ = logits_and_iou(segmenter(tiny_base), image, prompts)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.equal(before[0], frozen)  # the perturbed adapter does change the masks


def test_a_sam1_adapter_is_refused_by_a_sam21_model_naming_the_first_layer(tiny_base, tmp_path):
    sam1 = build_segmenter(ModelConfig(backbone="vit_tiny", adapter=ADAPTERS["gara"]), pretrained=False)
    folder = save_adapter(sam1, tmp_path / "sam1-adapter")
    adapted = segmenter(tiny_base, ADAPTERS["gara"])
    before = {k: v.clone() for k, v in adapter_state_dict(adapted).items()}
    first = r"^layer image_encoder\.trunk\.blocks\.0\.attn\.qkv: .*'vit_tiny'"
    with pytest.raises(AdapterFormatError, match=first):
        load_adapter_weights(adapted, folder)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(adapted).items())


def test_only_sam21_versions_require_the_sam2_package():
    requirements = {name: {pin.split("==")[0] for pin in serving_requirements(name)}
                    for name in ("vit_tiny", "lite_medsam", TINY)}
    assert {"sam2", "hydra-core", "omegaconf", "iopath"} <= requirements[TINY]
    assert "sam2" not in requirements["vit_tiny"] | requirements["lite_medsam"]
    assert {"torch", "segment-anything"} <= requirements["vit_tiny"] & requirements[TINY]


def test_wesam_trains_sam21_and_contrasts_its_image_embeddings(tmp_path, monkeypatch):
    """WeSAM's instance contrast pools the image embedding (C = the prompt encoder's width),
    not the packed high-resolution maps that ride along in Sam2Segmenter.encode's output."""
    import gara.train.wesam
    from bench.bench_wesam import wesam_train

    pooled_widths = []
    contrast = gara.train.wesam.instance_contrast

    def recording(teacher_embeddings, *args, **kwargs):
        pooled_widths.append(teacher_embeddings.shape[1])
        return contrast(teacher_embeddings, *args, **kwargs)

    monkeypatch.setattr(gara.train.wesam, "instance_contrast", recording)
    torch.manual_seed(0)
    seg = build_segmenter(ModelConfig(backbone=TINY, adapter=ADAPTERS["lora"]), pretrained=False)
    before = {k: p.detach().clone() for k, p in adapter_state_dict(seg).items()}
    history = wesam_train(seg, make_dataset(tmp_path / "data", 3, 0), steps=2, lr=1e-3)
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
    assert {"loss/self", "loss/anchor", "loss/contrast"} <= set(history[0])
    assert pooled_widths and set(pooled_widths) == {seg.prompt_encoder.embed_dim}
    assert any(not torch.equal(before[k], p) for k, p in adapter_state_dict(seg).items())


# --- gara info ------------------------------------------------------------------------------
def gara_layer_params(width: int, width_out: int, low: int = 16, high: int = 256) -> int:
    """One GaRA layer on a qkv (width -> 3 width_out), ranks capped at width / 2: q, k, v each
    r x (width + width_out), the space gate (width -> 64 -> 1) and the two component gates
    (width -> 16 -> 16 -> r)."""
    r_low, r_high = min(low, width // 2), min(high, width // 2)
    adapter = 3 * (r_low + r_high) * (width + width_out)
    space = width * 64 + 64 + 64 + 1
    components = sum(width * 16 + 16 + 16 * 16 + 16 + 16 * r + r for r in (r_low, r_high))
    return adapter + space + components


def hiera_widths(embed_dim: int, stages: list[int]) -> list[tuple[int, int]]:
    """(input, output) width of each block: the first block of each later stage doubles it."""
    widths, width = [], embed_dim
    for stage, depth in enumerate(stages):
        for block in range(depth):
            out = width * 2 if stage and not block else width
            widths.append((width, out))
            width = out
    return widths


def test_info_reports_gara_on_hiera_b_plus_with_the_method_count():
    """Hiera-B+ (the package's config: width 112, stages 2/3/16/3) with GaRA r_L 16, r_H 256."""
    proc = subprocess.run([sys.executable, "-m", "gara.cli", "info", "--backbone", "sam2.1_hiera_b+",
                           "--adapter", "gara", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    widths = hiera_widths(112, [2, 3, 16, 3])
    assert [row["params"] for row in report["adapted_layers"]] == [gara_layer_params(*w) for w in widths]
    assert report["trainable_params"] == sum(gara_layer_params(*w) for w in widths) == 15_399_056


def test_info_counts_the_adapted_blocks_of_the_four_sizes():
    counts = {}
    for name in ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"):
        config = ModelConfig(backbone=name, adapter=AdapterConfig(kind="lora"))
        seg = build_segmenter(config, pretrained=False)
        counts[name] = len(parameter_report(seg)["adapted_layers"])
    assert list(counts.values()) == [12, 16, 24, 48]


# --- end to end: train, evaluate, register, pull ---------------------------------------------
@pytest.mark.slow
def test_tiny_sam21_trains_evaluates_registers_and_pulls(
    ray_cluster, tiny_base, mlflow_server, s3_env, tmp_path, monkeypatch  # noqa: F811
):
    import mlflow
    from typer.testing import CliRunner

    from gara.cli import app
    from gara.tracking import active_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GARA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GARA_S3_ENDPOINT_URL", s3_env.endpoint_url)
    train_data, val_data = make_dataset(tmp_path / "train", 6, 0), make_dataset(tmp_path / "val", 3, 1)
    params = {
        "model": {"backbone": TINY, "checkpoint": str(tiny_base.path), "checkpoint_sha256": tiny_base.sha256,
                  "adapter": ADAPTERS["gara"].model_dump()},
        "train": {"data": str(train_data), "val_data": str(val_data), "storage_path": str(tmp_path / "ray"),
                  "lr": 1e-3, "batch_size": 3, "val_max_images": 2, "max_failures": 0,
                  "mlflow": {"tracking_uri": mlflow_server, "experiment": "sam21-e2e"}},
        "registry": {"name": "gara-sam21", "base_uri": publish_base(s3_env, tiny_base.path)},
    }
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params), encoding="utf-8")
    runner = CliRunner()

    adapter = tmp_path / "adapter"
    result = runner.invoke(app, ["train", "--params", str(params_file), "--workers", "1", "--epochs", "2",
                                 "--out", str(adapter)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    manifest = read_manifest(adapter)
    assert manifest.backbone == TINY and manifest.base_checkpoint_sha256 == tiny_base.sha256
    assert manifest.adapted_layers[0] == "image_encoder.trunk.blocks.0.attn.qkv"

    report = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", "--params", str(params_file), "--model", "base",
                                 "--model", f"gara={adapter}", "--data", str(val_data), "--out", str(report),
                                 "--ray-workers", "0", "--no-progress"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["models"]) == {"base", "gara"}
    records = pd.read_csv(report / "records.csv")
    scored = 3 * 2 * records["kind"].nunique()  # 3 images x 2 instances, per prompt kind
    assert records.groupby("model").size().to_dict() == {"base": scored, "gara": scored}
    assert records["iou"].between(0, 100).all()

    registered = tmp_path / "registered.json"
    result = runner.invoke(app, ["register", "--params", str(params_file), "--adapter", str(adapter),
                                 "--report", str(report), "--candidate", "gara", "--out", str(registered)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    version = json.loads(registered.read_text(encoding="utf-8"))["version"]
    with active_store(mlflow_server):  # what a clean serving environment installs
        requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/gara-sam21/{version}")).read_text()
    assert "sam2==1.1.0" in requirements.splitlines() and "hydra-core==" in requirements

    # A fresh process, as a downstream team: the version's code and adapter, the base from S3.
    image = np.random.default_rng(1).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    boxes = [[5.0, 8.0, 60.0, 50.0]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    proc = subprocess.run(
        [sys.executable, "-c", PULL_SCRIPT, str(tmp_path / "image.npy"), f"models:/gara-sam21/{version}",
         json.dumps(boxes), str(tmp_path / "out.npz")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pulled = np.load(tmp_path / "out.npz")
    with torch.inference_mode():
        masks, scores = load_adapted_segmenter(adapter).predict(image, Prompts(boxes=torch.tensor(boxes)))
    np.testing.assert_array_equal(pulled["masks"], masks)
    np.testing.assert_allclose(pulled["scores"], scores, rtol=1e-5, atol=1e-6)

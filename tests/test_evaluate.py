"""Evaluation: metrics by hand, shared prompts, the metrics.json contract, model specs, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from gara.config import EvaluateConfig, ModelConfig, PromptConfig
from gara.data.coco import mask_bbox, mask_to_rle, write_coco
from gara.data.corrupt import corrupt_dataset
from gara.data.prompts import prompts_from_masks
from gara.evaluate.metrics import instance_scores, mask_dice, mask_iou, mean_over_images
from gara.evaluate.report import build_metrics, summarize_model, write_report
from gara.evaluate.runner import (
    EvaluationResult,
    ModelSpecError,
    SharedPrefixes,
    evaluate_models,
    has_gara,
    image_infos,
    resolve_model,
    select_images,
)
from gara.models.adapter_io import save_adapter
from gara.models.adapters.config import AdapterConfig
from gara.models.backbones import build_backbone
from gara.models.factory import build_segmenter
from gara.models.inject import adapter_state_dict
from gara.models.segmenter import Prompts, Segmenter, SegmenterOutput
from gara.models.transforms import ImageMeta
from tests.conftest import write_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
BRIGHT, DARK = 200, 10  # clean images are bright, "corrupted" ones dark (the fake model keys on it)


# --- fixtures ----------------------------------------------------------------------------


def _rects(offset: int) -> list[np.ndarray]:
    a = np.zeros((SIZE, SIZE), bool)
    a[8 + offset : 28 + offset, 6:30] = True
    b = np.zeros((SIZE, SIZE), bool)
    b[36:58, 34 + offset : 60] = True
    return [a, b]


def _tagged_dataset(root: Path) -> Path:
    """2 source images, each clean + fog s1, fog s3, gaussian_noise s1 (tags written by hand)."""
    variants = [("clean", 0), ("fog", 1), ("fog", 3), ("gaussian_noise", 1)]
    images, anns = [], []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for source in (1, 2):
        masks = _rects(source * 2)
        for corruption, severity in variants:
            image_id = len(images) + 1
            value = BRIGHT if corruption == "clean" else DARK
            img = np.full((SIZE, SIZE, 3), value, np.uint8)
            name = f"images/{source}_{corruption}_{severity}.png"
            cv2.imwrite(str(root / name), img)
            images.append({"id": image_id, "file_name": name, "height": SIZE, "width": SIZE,
                           "corruption": corruption, "severity": severity, "source_image_id": source})
            for k, m in enumerate(masks):
                anns.append({
                    "id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                    "segmentation": mask_to_rle(m), "bbox": mask_bbox(m), "area": float(m.sum()),
                    "source_annotation_id": 100 * source + k,
                })
    write_coco(root, {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "rect"}]})
    return root


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tagged_dataset(tmp_path_factory.mktemp("tagged"))


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `gara corrupt` output: 2 source images x (clean + fog, gaussian_noise at s1, s3)."""
    rng = np.random.default_rng(0)
    pictures = []
    for i in (1, 2):
        img = rng.integers(30, 90, size=(SIZE, SIZE + 16, 3), dtype=np.uint8)
        masks = [np.pad(m, ((0, 0), (0, 16))) for m in _rects(i)]
        for m in masks:
            img[m] = (220, 60, 40)
        pictures.append((img, masks))
    root = write_dataset(tmp_path_factory.mktemp("raw"), pictures)
    out = tmp_path_factory.mktemp("corrupted")
    corrupt_dataset(root, out, types=["fog", "gaussian_noise"], severities=[1, 3], workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_vit_checkpoint) -> str:
    return str(tiny_vit_checkpoint.path)


@pytest.fixture(scope="module")
def tiny_config(tiny_checkpoint: str) -> ModelConfig:
    return ModelConfig(backbone="vit_tiny", checkpoint=tiny_checkpoint)


@pytest.fixture(scope="module")
def adapter_dir(tiny_config: ModelConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    return save_adapter(build_segmenter(tiny_config), tmp_path_factory.mktemp("adapter") / "gara")


class Recording(Segmenter):
    """A real segmenter that records every prompt object it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[Prompts] = []

    def prompts_to_input(self, prompts: Prompts, meta: ImageMeta) -> Prompts:
        self.received.append(prompts)
        return super().prompts_to_input(prompts, meta)


class CleanOracle(Recording):
    """Perfect on bright (clean) images with box prompts, empty masks otherwise.

    A box prompt filled is exactly a rectangle ground truth; point prompts and dark images
    give nothing. "Embeddings" are just each image's mean normalised value.
    """

    def prompts_to_input(self, prompts: Prompts, meta: ImageMeta) -> Prompts:
        self.received.append(prompts)
        return prompts  # keep pixel coordinates: masks_at_input_resolution rasterises them

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.mean(dim=(1, 2, 3))

    def decode(self, embeddings: torch.Tensor, prompts: Any) -> SegmenterOutput:
        logits = []
        for brightness, p in zip(embeddings, prompts, strict=True):
            if p.boxes is None or brightness <= 0:
                logits.append(torch.full((len(p), 4), -1.0))
            else:
                logits.append(p.boxes.clone())
        return SegmenterOutput(logits, [torch.ones(len(t), 1) for t in logits])

    def masks_at_input_resolution(self, output: SegmenterOutput, metas: Any) -> list[torch.Tensor]:
        out = []
        for boxes, meta in zip(output.low_res_logits, metas, strict=True):
            masks = torch.full((len(boxes), *meta.original_size), -1.0)
            for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                if x1 > x0:
                    masks[k, y0:y1, x0:x1] = 1.0
            out.append(masks)
        return out


class Blind(CleanOracle):
    """Predicts nothing, ever: IoU 0 everywhere."""

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.full((len(batch),), -1.0)


class Mutating(CleanOracle):
    def prompts_to_input(self, prompts: Prompts, meta: ImageMeta) -> Prompts:
        if prompts.boxes is not None:
            prompts.boxes += 1  # a bug: edits the shared prompts in place
        return super().prompts_to_input(prompts, meta)


def _tiny(cls: type[Segmenter]) -> Segmenter:
    torch.manual_seed(0)
    return cls(build_backbone("vit_tiny", pretrained=False)).eval()


# --- metrics -----------------------------------------------------------------------------


def test_iou_and_dice_by_hand_with_the_empty_cases() -> None:
    pred = np.zeros((4, 4), bool)
    pred[:2, :2] = True  # 4 pixels
    gt = np.zeros((4, 4), bool)
    gt[0, :] = True  # 4 pixels, 2 shared with pred: union 6
    assert mask_iou(pred, gt) == pytest.approx(100 * 2 / 6)
    assert mask_dice(pred, gt) == pytest.approx(100 * 2 * 2 / 8)
    empty = np.zeros((4, 4), bool)
    assert mask_iou(empty, empty) == 100.0 and mask_dice(empty, empty) == 100.0  # empty union
    assert mask_iou(empty, gt) == 0.0 and mask_dice(gt, empty) == 0.0
    iou, dice = instance_scores(np.stack([pred, gt, empty]), np.stack([gt, gt, gt]))
    np.testing.assert_allclose(iou, [100 / 3, 100, 0])
    np.testing.assert_allclose(dice, [50, 100, 0])


def test_average_within_each_image_then_over_images() -> None:
    # Image 1: instances 100 and 0 (mean 50); image 2: one instance 80. Per image then over
    # images: (50 + 80) / 2 = 65, not the instance mean 60.
    records = pd.DataFrame({"image_id": [1, 1, 2], "iou": [100.0, 0.0, 80.0]})
    row = mean_over_images(records, ["iou"]).iloc[0]
    assert row["iou"] == pytest.approx(65.0)
    assert (row["n_images"], row["n_instances"]) == (2, 3)


def test_degrade_is_mean_over_types_of_type_means() -> None:
    rows = [("clean", 0, 1, 100.0), ("clean", 0, 2, 90.0)]
    rows += [("fog", 1, 3, 0.0), ("fog", 3, 4, 0.0), ("fog", 5, 5, 0.0)]  # fog: 0 over 3 images
    rows += [("snow", 1, 6, 60.0), ("snow", 1, 6, 60.0)]  # snow: 60 over 1 image
    records = pd.DataFrame([
        {"model": "m", "kind": "box", "corruption": c, "severity": s, "image_id": i, "iou": v, "dice": v,
         "effective_rank": float("nan")}
        for c, s, i, v in rows
    ])
    doc = summarize_model(records, "m")
    assert doc["summary"]["clear"]["box"]["iou"] == pytest.approx(95.0)
    assert doc["summary"]["degrade"]["box"]["iou"] == pytest.approx(30.0)  # (0 + 60) / 2, not 15
    assert doc["summary"]["clear"]["point"]["iou"] is None  # point not evaluated: null, key kept
    assert doc["table"]["snow"]["1"]["box"] == {"iou": 60.0, "dice": 60.0, "n_images": 1, "n_instances": 2}
    assert "effective_rank" not in doc["summary"]


# --- runner + report ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle_run(tagged: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A blind base then the clean oracle (primary) on the tagged dataset."""
    models = {"base": _tiny(Blind), "oracle": _tiny(CleanOracle)}
    config = EvaluateConfig(overlay_images=1, batch_size=3, prompts=PromptConfig(n_points=2))
    result = evaluate_models(models, tagged, config, progress=False)
    out = tmp_path_factory.mktemp("report")
    return {"result": result, "metrics": write_report(result, out), "out": out, "models": models}


def test_every_model_gets_the_same_prompts_computed_once(oracle_run: dict[str, Any], tagged: Path) -> None:
    result: EvaluationResult = oracle_run["result"]
    base, oracle = oracle_run["models"]["base"], oracle_run["models"]["oracle"]
    assert len(base.received) == len(oracle.received) == 8 * 2  # 8 images x 2 prompt kinds
    for a, b in zip(base.received, oracle.received, strict=True):
        assert a is b  # the very same object, drawn once
    # ...and they are what prompts_from_masks gives, keyed by the source annotation id.
    from gara.data.dataset import InstanceDataset

    dataset = InstanceDataset(tagged)
    sample = dataset[dataset.image_ids.index(2)]  # fog s1 of source 1
    keys = [100 + k for k in range(len(sample["masks"]))]
    expected = prompts_from_masks(sample["masks"], "point", 2, 0, keys)
    torch.testing.assert_close(result.prompts[2]["point"].points, expected.points)
    # Same source annotations: the clean image (id 1) got the same points as its fog variant.
    torch.testing.assert_close(result.prompts[1]["point"].points, result.prompts[2]["point"].points)


def test_metrics_json_contract_and_clear_degrade_split(oracle_run: dict[str, Any]) -> None:
    result, metrics, out = oracle_run["result"], oracle_run["metrics"], oracle_run["out"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["primary"] == "oracle" and list(on_disk["models"]) == ["base", "oracle"]
    s = on_disk["summary"]
    assert s["clear"]["box"] == {"iou": 100.0, "dice": 100.0}  # perfect on clean
    assert s["degrade"]["box"] == {"iou": 0.0, "dice": 0.0}  # nothing on corrupted
    assert s["clear"]["point"]["iou"] == 0.0 and s["degrade"]["point"]["dice"] == 0.0
    assert on_disk["table"]["fog"]["3"]["box"]["iou"] == 0.0
    assert on_disk["models"]["base"]["summary"]["clear"]["box"]["iou"] == 0.0  # per model, not pooled
    clean = on_disk["table"]["clean"]["0"]["box"]
    assert clean == {"iou": 100.0, "dice": 100.0, "n_images": 2, "n_instances": 4}
    assert on_disk["images"] == {"evaluated": 8, "source_images": 2, "clean": 2, "corrupted": 6,
                                 "skipped_without_instances": 0, "instances": 16,
                                 "source_kinds": {"untagged": 2}}
    assert on_disk["corruption_types"] == ["fog", "gaussian_noise"] and on_disk["severities"] == [1, 3]
    for model in on_disk["models"].values():  # every leaf of every summary is on 0-100 (or null)
        for part in ("clear", "degrade"):
            for kind in ("box", "point"):
                for v in model["summary"][part][kind].values():
                    assert v is None or 0.0 <= v <= 100.0
    curves = pd.read_csv(out / "plots" / "iou_vs_severity.csv")
    columns = ["model", "corruption", "severity", "iou", "iou_low", "iou_high", "n_sources"]
    assert list(curves.columns) == columns
    assert set(curves.corruption) == {"mean over types", "fog", "gaussian_noise"}
    oracle_fog = curves[(curves.model == "oracle") & (curves.corruption == "fog")]
    assert oracle_fog.set_index("severity")["iou"].to_dict() == {0: 100.0, 1: 0.0, 3: 0.0}
    assert curves[["iou_low", "iou_high"]].isna().all().all()  # 2 source images: too few for a band
    # Paired differences, both directions, with the interval over the 2 source images.
    paired = on_disk["models"]["oracle"]["paired"]["base"]
    everywhere = {"delta": 100.0, "ci_low": 100.0, "ci_high": 100.0, "n_sources": 2}
    assert paired["clear"]["box"]["iou"] == everywhere
    assert paired["degrade"]["box"]["iou"] == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n_sources": 2}
    assert on_disk["models"]["base"]["paired"]["oracle"]["clear"]["box"]["dice"]["delta"] == -100.0
    assert on_disk["bootstrap"] == {"resamples": 2000, "confidence": 0.95, "seed": 0, "unit": "source image"}
    pairs = pd.read_csv(out / "paired.csv")
    assert set(pairs["part"]) == {"clear", "degrade", "fog", "gaussian_noise"}
    assert set(zip(pairs["model"], pairs["other"], strict=True)) == {("oracle", "base"), ("base", "oracle")}
    report = (out / "report.md").read_text()
    assert "| oracle (primary) | 100.0 | 0.0 |" in report and "gaussian_noise" in report
    row = "| oracle - base | +100.00 [+100.00, +100.00] | +0.00 [+0.00, +0.00] no measurable difference |"
    assert row in report
    for png in ("iou_vs_severity.png", "overlays.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = pd.read_csv(out / "records.csv")
    assert len(records) == 8 * 2 * 2 * 2  # images x instances x kinds x models
    assert len(result.overlays) == 2 and set(result.overlays[0].predictions) == {"base", "oracle"}


def test_a_shared_frozen_prefix_changes_no_models_numbers(tiny_config: ModelConfig, tagged: Path) -> None:
    """Models on one base run its frozen encoder prefix once per batch; each must still score
    exactly as when evaluated alone."""
    torch.manual_seed(5)
    models = {"base": build_segmenter(tiny_config, with_adapter=False).eval()}
    for kind in ("lora", "gara"):
        seg = build_segmenter(tiny_config.model_copy(update={"adapter": AdapterConfig(kind=kind)}))
        with torch.no_grad():
            for p in adapter_state_dict(seg).values():
                p.add_(torch.randn_like(p) * 0.05)
        models[kind] = seg.eval()
    config = EvaluateConfig(overlay_images=0, batch_size=4)
    shared = SharedPrefixes(models, "no")
    assert set(shared.group_of) == set(models) and list(shared.length.values()) == [1]  # patch embedding
    together = evaluate_models(models, tagged, config, progress=False).records
    for name, model in models.items():
        alone = evaluate_models({name: model}, tagged, config, progress=False).records
        pd.testing.assert_frame_equal(together[together["model"] == name].reset_index(drop=True), alone)
    assert together.groupby("model")["iou"].mean().nunique() == 3  # the adapters do change the masks


def test_source_kinds_count_distinct_source_images_by_tag() -> None:
    from gara.evaluate.runner import ImageInfo, source_kinds

    coco = {"images": [{"id": 1, "source": "photo"}, {"id": 2, "source": "photo"},
                       {"id": 3, "source": "composite"}, {"id": 4}]}
    infos = [ImageInfo(0, 1, 1, "clean", 0), ImageInfo(1, 2, 1, "fog", 3),  # one photo, two variants
             ImageInfo(2, 3, 3, "clean", 0), ImageInfo(3, 4, 4, "clean", 0)]
    assert source_kinds(coco, infos) == {"composite": 1, "photo": 1, "untagged": 1}


def test_a_model_that_edits_its_prompts_is_refused(tagged: Path) -> None:
    models = {"bad": _tiny(Mutating), "other": _tiny(Blind)}
    config = EvaluateConfig(max_images=1, types=["fog"], severities=[1], overlay_images=0)
    with pytest.raises(RuntimeError, match="same prompts"):
        evaluate_models(models, tagged, config, progress=False)


def test_selection_by_source_type_and_severity(tagged: Path) -> None:
    from gara.data.coco import read_coco
    from gara.data.dataset import InstanceDataset

    infos = image_infos(InstanceDataset(tagged), read_coco(tagged))
    picked = select_images(infos, max_images=1, types=["fog"], severities=[3], seed=0)
    assert len({i.source_image_id for i in picked}) == 1
    assert [(i.corruption, i.severity) for i in picked] == [("clean", 0), ("fog", 3)]
    assert picked == select_images(infos, max_images=1, types=["fog"], severities=[3], seed=0)
    assert len(select_images(infos)) == 8
    with pytest.raises(ValueError, match="'snow'"):
        select_images(infos, types=["snow"])
    with pytest.raises(ValueError, match=r"\[5\]"):
        select_images(infos, severities=[5])


def test_untagged_dataset_counts_as_clean(corrupted: Path, tmp_path: Path) -> None:
    from gara.data.coco import read_coco
    from gara.data.dataset import InstanceDataset

    coco = read_coco(corrupted)
    keep = [e for e in coco["images"] if e["corruption"] == "clean"]
    for e in keep:
        for key in ("corruption", "severity", "source_image_id"):
            e.pop(key)
    ids = {e["id"] for e in keep}
    root = tmp_path / "plain"
    for e in keep:
        (root / e["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        (root / e["file_name"]).write_bytes((corrupted / e["file_name"]).read_bytes())
    anns = [a for a in coco["annotations"] if a["image_id"] in ids]
    write_coco(root, {"images": keep, "annotations": anns, "categories": coco["categories"]})
    infos = image_infos(InstanceDataset(root), read_coco(root))
    tags = [(i.corruption, i.severity, i.source_image_id == i.image_id) for i in infos]
    assert tags == [("clean", 0, True)] * 2
    config = EvaluateConfig(overlay_images=1)
    result = evaluate_models({"oracle": _tiny(CleanOracle)}, root, config, progress=False)
    metrics = build_metrics(result)
    assert metrics["summary"]["degrade"]["box"]["iou"] is None  # no corrupted image: null, not 0
    assert metrics["images"]["clean"] == 2


# --- model specs -------------------------------------------------------------------------


def test_adapter_folder_and_base_resolve_and_evaluate(
    tiny_config: ModelConfig, adapter_dir: Path, corrupted: Path
) -> None:
    name, base = resolve_model("base", tiny_config)
    assert name == "base" and not has_gara(base)
    name, adapted = resolve_model(f"cand={adapter_dir}", tiny_config)
    assert name == "cand" and has_gara(adapted) and not adapted.training
    assert resolve_model(str(adapter_dir / "adapter.json"), tiny_config)[0] == "gara"
    assert resolve_model(str(adapter_dir.parent), tiny_config)[0] == adapter_dir.parent.name  # found below
    config = EvaluateConfig(max_images=1, types=["fog"], severities=[3], overlay_images=0)
    result = evaluate_models({"base": base, "cand": adapted}, corrupted, config, progress=False)
    assert set(result.records["model"]) == {"base", "cand"}
    ranks = result.records.groupby("model")["effective_rank"]
    assert ranks.apply(lambda r: r.isna().all())["base"]
    assert ranks.apply(lambda r: r.notna().all() and (r > 0).all())["cand"]
    assert "effective_rank" in build_metrics(result)["summary"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_use_gpu_without_a_gpu_is_a_one_line_config_error(tiny_config: ModelConfig, corrupted: Path) -> None:
    from gara.config import ConfigError

    config = EvaluateConfig(use_gpu=True)
    with pytest.raises(ConfigError, match="evaluate.use_gpu: true, but torch sees no CUDA device"):
        evaluate_models({"base": resolve_model("base", tiny_config)[1]}, corrupted, config, progress=False)


def test_bad_specs_name_themselves(tiny_config: ModelConfig, tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="'nowhere/adapter'"):
        resolve_model("nowhere/adapter", tiny_config)
    with pytest.raises(ModelSpecError, match="no adapter.json"):
        resolve_model(f"x={tmp_path}", tiny_config)
    with pytest.raises(ModelSpecError, match="unsupported URI"):
        resolve_model("s3://bucket/adapter", tiny_config)


def test_mlflow_uris_resolve(tiny_config: ModelConfig, adapter_dir: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # A client, not the fluent API: no process-wide tracking URI left behind for other tests,
    # and artifacts under tmp_path rather than ./mlruns.
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("eval-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(adapter_dir), "model/artifacts/adapter")
    empty = client.create_run(experiment)
    client.log_text(empty.info.run_id, "nothing", "model/readme.txt")

    name, seg = resolve_model(f"runs:/{run.info.run_id}/model", tiny_config, tracking_uri=uri)
    assert name == f"run-{run.info.run_id[:8]}" and has_gara(seg)
    with pytest.raises(ModelSpecError, match="no adapter.json"):
        resolve_model(f"runs:/{empty.info.run_id}/model", tiny_config, tracking_uri=uri)

    client.create_registered_model("gara-sam")
    version = client.create_model_version("gara-sam", f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias("gara-sam", "champion", version.version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment wins over the params' URI
    name, seg = resolve_model("models:/gara-sam@champion", tiny_config, tracking_uri="sqlite:///elsewhere.db")
    assert name == "gara-sam@champion" and has_gara(seg)
    with pytest.raises(ModelSpecError, match="models:/gara-sam@nope"):
        resolve_model("models:/gara-sam@nope", tiny_config)


# --- CLI ---------------------------------------------------------------------------------


def test_cli_end_to_end(tiny_checkpoint: str, adapter_dir: Path, corrupted: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        f"model:\n  backbone: vit_tiny\n  checkpoint: {tiny_checkpoint}\n"
        f"evaluate:\n  data: {corrupted}\n  overlay_images: 1\n  prompts:\n    n_points: 2\n"
    )
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "gara.cli", "evaluate", "--model", "base", "--model", f"gara={adapter_dir}",
           "--out", str(out), "--params", str(params), "--max-images", "1", "--types", "fog",
           "--severities", "1,3", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "gara (primary)" in done.stdout and "box IoU degrade" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["primary"] == "gara" and metrics["prompts"]["n_points"] == 2
    assert metrics["images"]["evaluated"] == 3 and metrics["severities"] == [1, 3]
    assert 0.0 <= metrics["summary"]["degrade"]["box"]["iou"] <= 100.0
    for name in ("report.md", "records.csv", "plots/iou_vs_severity.png", "plots/overlays.png"):
        assert (out / name).is_file(), name


def test_cli_bad_model_is_a_one_line_user_error(
    tiny_checkpoint: str, corrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gara.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(f"model:\n  backbone: vit_tiny\n  checkpoint: {tiny_checkpoint}\n")
    argv = ["gara", "evaluate", "--model", "nowhere", "--data", str(corrupted), "--params", str(params)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model 'nowhere'") and "Traceback" not in err

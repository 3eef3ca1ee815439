"""Label-free distillation (gara/train/distill.py) and unlabelled datasets (gara/data/unlabelled.py).

The data is a plain folder of real photos (scikit-image's, resized) corrupted by the pipeline's
own code; steps run through the method object the Ray loop calls, on a seeded vit_tiny. The
Ray/MLflow path of the method is the pipeline's `train@gara_distill` stage
(tests/test_pipeline_e2e.py). Whether distillation beats the frozen base is a research claim
with a spread: `python bench/bench_seeds.py --rows gara_distill,gara --reference gara`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gara.config import ConfigError, DistillConfig, ModelConfig, TrainConfig, load_params
from gara.data.coco import DatasetFormatError, read_coco
from gara.data.corrupt import corrupt_dataset
from gara.data.dataset import InstanceDataset
from gara.data.validate import ProblemKind, validate_dataset
from gara.models.adapters.config import AdapterConfig
from gara.models.factory import build_segmenter
from gara.models.inject import adapter_layers
from gara.train.distill import (
    Distill,
    PairedImages,
    build_distill_batch,
    distill_loss,
    random_boxes,
    random_prompts,
)

PHOTOS = ("astronaut", "coffee", "rocket", "chelsea")


def write_photos(folder: Path) -> Path:
    """A plain folder of four real photos (two in a subfolder), 96 px on the longest side."""
    import skimage.data

    for k, name in enumerate(PHOTOS):
        rgb = Image.fromarray(np.asarray(getattr(skimage.data, name)())[:, :, :3])
        rgb.thumbnail((96, 96))
        path = folder / ("more" if k % 2 else "") / f"{name}.{'png' if k % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb.save(path)
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """The photo folder corrupted as the pipeline does it (clean copy + 2 variants each)."""
    root = tmp_path_factory.mktemp("distill")
    cfg = load_params(None).corrupt
    corrupt_dataset(write_photos(root / "photos"), root / "pairs", ["fog", "gaussian_noise", "elastic"],
                    cfg.severities, 0, 2, workers=1, progress=False)
    return root / "pairs"


def tiny(tiny_vit_checkpoint, kind: str = "gara"):
    torch.manual_seed(0)
    config = ModelConfig(backbone="vit_tiny", checkpoint=str(tiny_vit_checkpoint.path),
                         adapter=AdapterConfig(kind=kind))
    return build_segmenter(config)


# --- unlabelled data --------------------------------------------------------------------------
def test_a_plain_folder_is_a_dataset_with_zero_annotations_and_bad_images_are_named(tmp_path):
    folder = write_photos(tmp_path / "photos")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(b"ignored: hidden")
    outside = write_photos(tmp_path / "outside")
    (folder / "link.jpg").symlink_to(outside / "astronaut.jpg")  # links lead out of the folder:
    (folder / "linked").symlink_to(outside / "more", target_is_directory=True)  # never followed
    coco = read_coco(folder, unlabelled=True)
    names = [e["file_name"] for e in coco["images"]]
    assert names == ["astronaut.jpg", "more/chelsea.png", "more/coffee.png", "rocket.jpg"]
    assert coco["annotations"] == [] and validate_dataset(folder, unlabelled=True) == []
    # Only where a command asks for an unlabelled set: elsewhere a missing annotations.json is
    # an error (a labelled split that was not pulled must not pass as one without labels).
    with pytest.raises(DatasetFormatError, match="needs annotations.json$"):
        read_coco(folder)
    assert [p.kind for p in validate_dataset(folder)] == [ProblemKind.MISSING_FILE]

    good = (folder / "astronaut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a header PIL refuses
    Image.new("RGB", (20, 60)).save(folder / "icon.png")  # too small to prompt
    found = {(p.kind, p.file) for p in validate_dataset(folder, unlabelled=True)}
    assert found == {(ProblemKind.UNREADABLE_IMAGE, "cut.jpg"), (ProblemKind.UNREADABLE_IMAGE, "junk.png"),
                     (ProblemKind.TOO_SMALL, "icon.png")}
    with pytest.raises(DatasetFormatError, match="junk.png"):  # corrupt names what it cannot read
        corrupt_dataset(folder, tmp_path / "out", ["fog"], [3], 0, 1, workers=1, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


def test_an_unfinished_corrupt_output_is_not_an_unlabelled_dataset(pairs, tmp_path):
    """Its clean copies are images, but annotations.json comes last: until then it is refused."""
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(pairs, partial)
    (partial / "annotations.json").unlink()
    assert (partial / ".records").is_dir()
    problems = validate_dataset(partial, unlabelled=True)
    assert [p.kind for p in problems] == [ProblemKind.MISSING_FILE]
    assert "unfinished `gara corrupt` output" in problems[0].message


def test_an_empty_folder_is_not_a_dataset(tmp_path):
    with pytest.raises(DatasetFormatError, match="needs annotations.json .labelled. or image files"):
        read_coco(tmp_path, unlabelled=True)


def test_corrupt_makes_pairs_of_an_unlabelled_folder_and_distillation_reads_only_the_aligned_ones(pairs):
    coco = read_coco(pairs)
    assert coco["annotations"] == [] and len(coco["images"]) == 3 * len(PHOTOS)
    assert all("source_image_id" in e for e in coco["images"])
    data = PairedImages(pairs)
    geometric = sum(e["corruption"] == "elastic" for e in coco["images"])
    assert geometric > 0 and data.geometric_skipped == geometric
    assert len(data) == len(coco["images"]) - geometric
    def photo(file_name: str) -> str:  # images/clean/<photo>.png, images/<type>/s<n>/<photo>.png
        parts = Path(file_name).parts
        return "/".join(parts[2:] if parts[1] == "clean" else parts[3:])

    for variant, clean in data.pairs:  # the same photo: gara corrupt names both after it
        assert Path(clean["file_name"]).parts[1] == "clean" and photo(clean["file_name"]) == photo(
            variant["file_name"])
    assert {Path(v["file_name"]).parts[1] for v, _ in data.pairs} == {"clean", "fog", "gaussian_noise"}
    sample = data[0]
    assert "masks" not in sample and sample["image"].shape == sample["clean"].shape


def test_distillation_refuses_data_that_is_not_clean_corrupted_pairs(tmp_path):
    folder = write_photos(tmp_path / "photos")
    with pytest.raises(DatasetFormatError, match="run `gara corrupt --data"):
        PairedImages(folder)


def test_distill_params_are_validated():
    with pytest.raises(ConfigError, match="min_box_fraction"):
        load_params(None, {"train.distill.min_box_fraction": 0.8, "train.distill.max_box_fraction": 0.5})
    with pytest.raises(ConfigError, match="nothing to train"):
        load_params(None, {"train.distill.kl": 0, "train.distill.dice": 0, "train.distill.iou": 0})
    config = DistillConfig(prompts_per_image=50, min_box_fraction=0.2, max_box_fraction=0.6)
    boxes = random_boxes(40, 90, config, np.random.default_rng(0))
    assert boxes.shape == (50, 4) and (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 90).all()
    assert (boxes[:, 3] <= 40).all()
    sides = (boxes[:, 2:] - boxes[:, :2]) / [90, 40]
    assert (sides >= 0.2 - 1e-6).all() and (sides <= 0.6 + 1e-6).all()
    clicks = random_prompts(40, 90, "point", DistillConfig(prompts_per_image=50), np.random.default_rng(0))
    assert clicks.boxes is None and clicks.points.shape == (50, 1, 2) and (clicks.labels == 1).all()
    assert (clicks.points >= 0).all() and (clicks.points[..., 0] <= 90).all()
    assert (clicks.points[..., 1] <= 40).all()


# --- the method -------------------------------------------------------------------------------
def recording_encoder(segmenter, seen: list[tuple[bool, torch.Tensor]]) -> None:
    """Record every image batch the encoder receives, and whether the adapters were on."""
    layers = list(adapter_layers(segmenter).values())

    def hook(_module, args):
        seen.append((layers[0].adapter_enabled, args[0].detach().clone()))

    segmenter.image_encoder.register_forward_pre_hook(hook)


@pytest.mark.parametrize("kind", ["gara", "lora", "adaptformer"])
def test_the_teacher_sees_only_clean_sources_and_the_student_trains_without_a_mask(
        labelled_pairs, tiny_vit_checkpoint, monkeypatch, kind):
    def no_labelled_sample(*args, **kwargs):
        raise AssertionError("distillation loaded a labelled sample (masks)")

    # Pairs corrupted from a labelled set: their masks are there, and must never be loaded.
    monkeypatch.setattr(InstanceDataset, "__getitem__", no_labelled_sample)
    segmenter = tiny(tiny_vit_checkpoint, kind)
    prompts = ["point"] if kind == "lora" else ["box"]  # both prompt kinds reach the same step
    train = TrainConfig(method="distill", data=str(labelled_pairs), batch_size=2,
                        distill=DistillConfig(prompts=prompts))
    method = Distill(train, segmenter)
    corrupted = [i for i, (v, _) in enumerate(method.dataset.pairs) if v["corruption"] != "clean"][:2]
    samples = [method.dataset[i] for i in corrupted]
    seen: list[tuple[bool, torch.Tensor]] = []
    recording_encoder(segmenter, seen)
    before = {k: p.detach().clone() for k, p in segmenter.named_parameters() if p.requires_grad}
    params = [p for p in segmenter.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    segmenter.train()
    loss, metrics, _ = method.step(method.module, method.batch(samples, 0), optimizer, None, None, 0)

    clean, _ = segmenter.preprocess([s["clean"] for s in samples])
    degraded, _ = segmenter.preprocess([s["image"] for s in samples])
    teacher = [x for enabled, x in seen if not enabled]
    student = [x for enabled, x in seen if enabled]
    assert len(teacher) == 1 and torch.equal(teacher[0], clean) and not torch.equal(teacher[0], degraded)
    assert len(student) == 1 and torch.equal(student[0], degraded)
    assert loss > 0
    assert {"loss/kl", "loss/soft_dice", "loss/iou_to_teacher", "teacher_agreement"} <= set(metrics)
    assert any(not torch.equal(before[k], p) for k, p in segmenter.named_parameters() if p.requires_grad)
    monkeypatch.undo()
    labelled = InstanceDataset(labelled_pairs)[0]  # a supervised sample, masks and all
    with pytest.raises(TypeError, match="trains without labels"):
        build_distill_batch(segmenter, [labelled], DistillConfig(), 0, 0)


@pytest.fixture(scope="module")
def labelled_pairs(tmp_path_factory) -> Path:
    """Two labelled pictures (a bright rectangle each) corrupted into pairs, masks included."""
    from tests.conftest import write_dataset

    root = tmp_path_factory.mktemp("labelled")
    pictures = []
    for k in range(2):
        rgb = np.full((64, 80, 3), 60 + 40 * k, np.uint8)
        mask = np.zeros((64, 80), bool)
        mask[10:40, 20 + 10 * k:60] = True
        rgb[mask] = 220
        pictures.append((rgb, [mask]))
    write_dataset(root / "src", pictures)
    corrupt_dataset(root / "src", root / "pairs", ["fog", "gaussian_noise"], [3], 0, 2, workers=1,
                    progress=False)
    assert read_coco(root / "pairs")["annotations"]
    return root / "pairs"


@pytest.mark.parametrize("kind", ["gara", "lora", "adaptformer"])
def test_the_loss_is_zero_when_the_student_is_the_teacher(pairs, tiny_vit_checkpoint, kind):
    segmenter = tiny(tiny_vit_checkpoint, kind)  # adapters at init: the student IS the base
    config = DistillConfig(feature=1.0)  # every term on
    method = Distill(TrainConfig(method="distill", data=str(pairs), distill=config), segmenter)
    by_kind = {v["corruption"] == "clean": i for i, (v, _) in enumerate(method.dataset.pairs)}
    optimizer = torch.optim.Adam([p for p in segmenter.parameters() if p.requires_grad], lr=0.0)
    loss, metrics, _ = method.step(method.module, method.batch([method.dataset[by_kind[True]]], 0), optimizer,
                                   None, None, 0)
    assert loss == pytest.approx(0.0, abs=1e-6) and metrics["teacher_agreement"] == 1.0
    terms = ("loss/kl", "loss/soft_dice", "loss/iou_to_teacher", "loss/feature")
    assert all(abs(metrics[k]) < 1e-6 for k in terms)
    corrupted = method.batch([method.dataset[by_kind[False]]], 0)
    loss, metrics, _ = method.step(method.module, corrupted, optimizer, None, None, 0)
    assert loss > 1e-4  # a corrupted copy moves the base's answer: that is what is learned


def test_the_loss_grows_as_the_student_drifts_from_the_teacher():
    from gara.models.segmenter import SegmenterOutput

    torch.manual_seed(0)
    teacher = SegmenterOutput([torch.randn(3, 1, 16, 16)], [torch.rand(3, 1)])
    losses = []
    for drift in (0.0, 0.5, 2.0):
        student = SegmenterOutput([teacher.low_res_logits[0] + drift * torch.randn(3, 1, 16, 16)],
                                  [teacher.iou_predictions[0] + drift / 4])
        terms = distill_loss(student, teacher, torch.zeros(1), None, [(12, 16)], DistillConfig())
        losses.append(float(terms.total))
    assert losses[0] == pytest.approx(0.0, abs=1e-6) and losses[0] < losses[1] < losses[2]
    # A confidently empty answer copied exactly is no loss either (sigmoid(-20) ~ 2e-9).
    empty = SegmenterOutput([torch.full((2, 1, 16, 16), -20.0)], [torch.zeros(2, 1)])
    terms = distill_loss(empty, empty, torch.zeros(1), None, [(16, 16)], DistillConfig())
    assert float(terms.total) == pytest.approx(0.0, abs=1e-6) and terms.metrics["loss/soft_dice"] < 1e-6


def test_the_unlabelled_sample_holds_no_val_photo():
    """The embedded unlabelled set is built from photos none of which is in the evaluation split."""
    from gara.data.sample import SPLITS, UNLABELLED_PHOTOS

    val = set(SPLITS["val"]["photos"]) | set(SPLITS["val"]["backgrounds"])
    assert not val & set(UNLABELLED_PHOTOS)
    data = Path(__file__).resolve().parents[1] / "data" / "unlabelled"
    if data.is_dir():  # after `dvc pull data.dvc`: the files are those photos' views
        names = {p.name.rsplit("_", 1)[0] for p in (data / "images").iterdir()}
        assert names == set(UNLABELLED_PHOTOS)
        assert not (data / "annotations.json").exists()


def test_training_refuses_data_its_method_cannot_learn_from_before_anything_starts(
        pairs, labelled_pairs, tmp_path):
    """The driver's preflight (before an MLflow run or a Ray cluster exists) names the fix."""
    from gara.train.launcher import check_data

    def check(method: str, data: Path) -> None:
        check_data(load_params(None, {"train.method": method, "train.data": str(data),
                                      "train.val_data": str(labelled_pairs)}))

    check("distill", pairs)  # unlabelled pairs: distillation's data
    check("distill", labelled_pairs)  # labelled pairs: labels are left unread
    check("supervised", labelled_pairs)
    for method in ("supervised", "wesam"):  # zero annotations would train nothing, silently
        with pytest.raises(DatasetFormatError, match="no annotations .an unlabelled set.*method=distill"):
            check(method, pairs)
    source = labelled_pairs.parent / "src"  # labelled, never corrupted: no pairs
    with pytest.raises(DatasetFormatError, match="no clean/corrupted pairs.*gara corrupt --data"):
        check("distill", source)
    with pytest.raises(DatasetFormatError, match="a plain folder of images .unlabelled.; run `gara corrupt"):
        check("distill", write_photos(tmp_path / "photos"))

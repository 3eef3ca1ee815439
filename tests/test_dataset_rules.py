"""One set of dataset rules, applied by every stage that reads a dataset (validate, corrupt,
train, evaluate) and one image reader (those stages, predict and the demo): bad input is a
clear error naming the file and id, nothing is read outside the folder or overwritten, and
16-bit or EXIF-rotated images are the same pixels as their 8-bit, upright twins."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from gara.cli import app
from gara.data.coco import annotation_mask, mask_bbox, read_coco
from gara.data.dataset import InstanceDataset
from gara.data.images import MAX_IMAGE_PIXELS, decode_image, displayed_size, read_image
from gara.data.validate import DatasetValidationError, validate_dataset

VAL = Path(__file__).resolve().parents[1] / "data" / "val"
H, W = 72, 96  # small crops of a real photo: every stage runs in a second or two
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    coco = read_coco(VAL)
    return read_image(VAL / coco["images"][0]["file_name"])[:H, :W].copy()


def _png(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels: only its header may be read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


# An object: a pentagon inside the image, its vertices on whole pixels.
POLYGON = [20.0, 10.0, 70.0, 14.0, 80.0, 50.0, 44.0, 64.0, 14.0, 44.0]


def _ann(ann_id: int, image_id: int, polygon: list[float] = POLYGON, **over: Any) -> dict[str, Any]:
    mask = annotation_mask({"segmentation": [polygon]}, H, W)
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "segmentation": [polygon],
            "bbox": mask_bbox(mask), "area": float(mask.sum()), **over}


def _dataset(root: Path, files: dict[str, bytes], images: list[dict[str, Any]] | None = None,
             annotations: list[dict[str, Any]] | None = None) -> Path:
    """A dataset folder: ``files`` under root, one entry per file (H x W) unless given."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    if images is None:
        images = [{"id": i, "file_name": name, "height": H, "width": W} for i, name in enumerate(files, 1)]
    if annotations is None:
        annotations = [_ann(i, entry["id"]) for i, entry in enumerate(images, 1)]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")
    return root


def _gara(*args: str) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_sets(tiny_vit_checkpoint) -> list[str]:
    return ["--set", "model.backbone=vit_tiny", "--set", f"model.checkpoint={tiny_vit_checkpoint.path}",
            "--set", "model.checkpoint_sha256=null"]


# --- the reader ------------------------------------------------------------------------------
def test_16bit_and_exif_images_decode_to_their_twins_pixels_in_every_reader(photo: np.ndarray) -> None:
    from gara.demo.session import decode_upload
    from gara.registry.model import decode_image as predict_decode

    grey = photo.mean(axis=2).round().astype(np.uint8)
    sixteen = _png(grey.astype(np.uint16) * 257)  # the same grey levels, 16 bits deep
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I")
    rotated = _png(np.rot90(photo, k=1), orientation=6)  # stored turned; shown upright
    for data, twin in ((sixteen, np.repeat(grey[..., None], 3, axis=2)), (rotated, photo)):
        for read in (lambda d: decode_image(d, "x"), lambda d: predict_decode(d, 0),
                     lambda d: decode_upload(d, "x")):
            np.testing.assert_array_equal(read(data), twin)
    # A JPEG says the same through its header: the displayed size, before any decode.
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(np.rot90(photo, k=1)).save(buffer, format="JPEG", quality=95, exif=exif)
    jpeg = buffer.getvalue()
    assert decode_image(jpeg, "x").shape == photo.shape
    assert np.abs(decode_image(jpeg, "x").astype(int) - photo).mean() < 4  # upright, up to JPEG loss


def test_displayed_size_reads_the_header_only(tmp_path: Path, photo: np.ndarray,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "r.png").write_bytes(_png(np.rot90(photo, k=1), orientation=6))
    Image.fromarray(photo).save(tmp_path / "plain.png")
    Image.fromarray(photo).save(tmp_path / "plain.jpg", quality=90)
    decoded = []
    load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self, *a: decoded.append(self.format) or load(self, *a))
    assert displayed_size(tmp_path / "r.png") == (W, H)
    assert displayed_size(tmp_path / "plain.png") == displayed_size(tmp_path / "plain.jpg") == (W, H)
    assert decoded == []  # no pixel was decoded
    (tmp_path / "bomb.png").write_bytes(_png_header(30000, 30000))
    (tmp_path / "big.png").write_bytes(_png_header(11000, 11000))
    with pytest.raises(OSError, match=rf"big.png: 11000x11000 is over the limit of {MAX_IMAGE_PIXELS:,}"):
        displayed_size(tmp_path / "big.png")
    with pytest.raises(OSError, match=rf"bomb.png: over the limit of {MAX_IMAGE_PIXELS:,}"):  # Pillow's check
        displayed_size(tmp_path / "bomb.png")


# --- twins through every stage ---------------------------------------------------------------------
def test_16bit_and_exif_twins_give_the_same_results_in_every_stage(
        tmp_path: Path, photo: np.ndarray, tiny_sets: list[str]) -> None:
    grey = photo.mean(axis=2).round().astype(np.uint8)
    plain = _dataset(tmp_path / "plain", {"images/grey.png": _png(grey), "images/photo.png": _png(photo)})
    twins = _dataset(tmp_path / "twins", {"images/grey.png": _png(grey.astype(np.uint16) * 257),
                                          "images/photo.png": _png(np.rot90(photo, k=1), orientation=6)})
    for root in (plain, twins):
        assert validate_dataset(root) == []
    # train: what each worker loads
    for a, b in zip(InstanceDataset(plain), InstanceDataset(twins), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["masks"], b["masks"])
    # corrupt: the same variants, byte for byte
    outs = []
    for root in (plain, twins):
        out = tmp_path / f"{root.name}-corrupted"
        result = _gara("corrupt", "--data", root, "--out", out, "--types", "fog",
                       "--severities", "3", "--workers", "1", "--no-progress")
        assert result.exit_code == 0, result.output
        outs.append(out)
    for name in ("images/clean/grey.png", "images/fog/s3/photo.png"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    # evaluate: the same IoU for every image and prompt
    records = []
    for root in (plain, twins):
        report = tmp_path / f"{root.name}-report"
        result = _gara("evaluate", "--model", "base", "--data", root, "--out", report, "--no-progress",
                       *tiny_sets)
        assert result.exit_code == 0, result.output
        records.append(pd.read_csv(report / "records.csv"))
    assert len(records[0]) == len(records[1]) > 0
    np.testing.assert_array_equal(records[0]["iou"].to_numpy(), records[1]["iou"].to_numpy())


# --- bad input, through every stage -----------------------------------------------------------------
def _outside(root: Path, photo: np.ndarray) -> Path:
    outside = root.parent / f"{root.name}-outside.png"
    outside.write_bytes(_png(photo))
    return outside


# Each case writes a dataset with one fault and returns it with what every stage's one-line
# error must say: the file, the image (and annotation) id, the kind.
def case_absolute(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    outside = _outside(root, photo)
    images = [{"id": 1, "file_name": str(outside), "height": H, "width": W}]
    return _dataset(root, {}, images), f"{outside}, image 1: [outside-folder]"


def case_dotdot(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    outside = _outside(root, photo)
    images = [{"id": 1, "file_name": f"../{outside.name}", "height": H, "width": W}]
    return _dataset(root, {}, images), f"../{outside.name}, image 1: [outside-folder]"


def case_symlink_out(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    outside = _outside(root, photo)
    root = _dataset(root, {"images/a.png": _png(photo)})
    (root / "images/a.png").unlink()
    (root / "images/a.png").symlink_to(outside)
    return root, "images/a.png, image 1: [outside-folder]"


def case_duplicate_ids(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    images = [{"id": 1, "file_name": "images/a.png", "height": H, "width": W},
              {"id": 1, "file_name": "images/b.png", "height": H, "width": W}]
    files = {"images/a.png": _png(photo), "images/b.png": _png(photo[::-1].copy())}
    return _dataset(root, files, images, [_ann(1, 1)]), "annotations.json, image 1: [duplicate-id]"


def case_pixel_bomb(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    images = [{"id": 1, "file_name": "images/bomb.png", "height": 30000, "width": 30000}]
    root = _dataset(root, {"images/bomb.png": _png_header(30000, 30000)}, images, [])
    return root, "images/bomb.png, image 1: [unreadable-image]"


def case_large(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    images = [{"id": 1, "file_name": "images/big.png", "height": 11000, "width": 11000}]
    root = _dataset(root, {"images/big.png": _png_header(11000, 11000)}, images, [])
    return root, "images/big.png, image 1: [unreadable-image]"


def case_zero_bytes(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    return _dataset(root, {"images/a.png": b""}), "images/a.png, image 1: [unreadable-image]"


def _bad_annotation(root: Path, photo: np.ndarray, ann: dict[str, Any], kind: str) -> tuple[Path, str]:
    root = _dataset(root, {"images/a.png": _png(photo)}, None, [ann])
    return root, f"annotations.json, image 1, annotation 1: [{kind}]"


def case_negative_bbox(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    return _bad_annotation(root, photo, _ann(1, 1, bbox=[20, 10, -5, 30]), "bad-bbox")


def case_two_point_polygon(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    ann = {**_ann(1, 1), "segmentation": [[10.0, 10.0, 40.0, 40.0]]}
    return _bad_annotation(root, photo, ann, "bad-segmentation")


def case_unknown_category(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    return _bad_annotation(root, photo, _ann(1, 1, category_id=7), "unknown-category")


def case_overshoot_5px(root: Path, photo: np.ndarray) -> tuple[Path, str]:
    polygon = [10.0, 10.0, W + 5.0, 10.0, W + 5.0, 40.0, 10.0, 40.0]
    return _bad_annotation(root, photo, _ann(1, 1, polygon), "mask-outside")


BAD_CASES = [case_absolute, case_dotdot, case_symlink_out, case_duplicate_ids, case_pixel_bomb, case_large,
             case_zero_bytes, case_negative_bbox, case_two_point_polygon, case_unknown_category,
             case_overshoot_5px]


def _one_line_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.__name__[5:])
def test_each_bad_input_is_refused_by_every_stage_naming_file_and_id(
        case, tmp_path: Path, photo: np.ndarray, tiny_sets: list[str]) -> None:
    root, where = case(tmp_path / "data", photo)
    file, ids_kind = where.split(", ", 1)
    kind = ids_kind.rsplit("[", 1)[1].rstrip("]")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    # validate: every problem in a table (KIND FILE IMAGE ANN MESSAGE), exit 1
    result = _gara("data", "validate", root)
    assert result.exit_code == 1, result.output
    ann = "1" if "annotation 1" in where else ""
    row = f"{kind} +{re.escape(file)} +1 +{ann}"
    assert re.search(row, result.output), result.output
    # corrupt: refused, naming the file; no finished output, nothing copied from outside
    out = tmp_path / "corrupted"
    result = _gara("corrupt", "--data", root, "--out", out, "--types", "fog", "--severities", "1",
                   "--workers", "1", "--no-progress")
    _one_line_error(result, where)
    assert not (out / "annotations.json").exists()
    if kind == "outside-folder":
        assert not list(out.rglob("*.png"))  # the outside photo was never read, so never copied
    # train: refused in the driver, before any run or cluster exists; and by what each worker loads
    result = _gara("train", "--set", f"train.data={root}", "--set", f"train.val_data={root}",
                   "--set", f"train.mlflow.tracking_uri=file://{tmp_path / 'mlruns'}", *tiny_sets)
    _one_line_error(result, where)
    assert not (tmp_path / "mlruns").exists()
    with pytest.raises(DatasetValidationError, match=re.escape(where)):
        InstanceDataset(root)
    # evaluate
    result = _gara("evaluate", "--model", "base", "--data", root, "--out", tmp_path / "report",
                   "--no-progress", *tiny_sets)
    _one_line_error(result, where)
    after = {p: p.read_bytes() for p in before}
    assert after == before  # nothing changed, the files outside the folder included


def test_subpixel_overshoot_is_clipped_with_a_warning_by_every_stage(
        tmp_path: Path, photo: np.ndarray, tiny_sets: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """0.4 px past a border (what annotation tools save) is accepted, counted and clipped."""
    over = [-0.4, 10.0, W + 0.4, 10.0, W + 0.4, H + 0.4, -0.4, H + 0.4]
    inside = [0.0, 10.0, W, 10.0, W, H, 0.0, H]
    root = _dataset(tmp_path / "data", {"images/a.png": _png(photo)}, None, [_ann(1, 1, over)])
    warning = "reach up to 0.40 px past the image border (annotation id 1"

    def warned() -> bool:
        found = any(warning in r.getMessage() for r in caplog.records)
        caplog.clear()
        return found

    result = _gara("data", "validate", root)
    assert result.exit_code == 0 and warned(), result.output
    out = tmp_path / "corrupted"
    result = _gara("corrupt", "--data", root, "--out", out, "--types", "fog", "--severities", "1",
                   "--workers", "1", "--no-progress")
    assert result.exit_code == 0 and warned(), result.output
    assert validate_dataset(out) == [] and warned()  # the output carries the polygon: still accepted
    sample = InstanceDataset(root)[0]
    assert warned()
    np.testing.assert_array_equal(sample["masks"][0], annotation_mask({"segmentation": [inside]}, H, W))
    result = _gara("evaluate", "--model", "base", "--data", root, "--out", tmp_path / "report",
                   "--no-progress", *tiny_sets)
    assert result.exit_code == 0 and warned(), result.output


# --- outputs never overwrite someone else's dataset ------------------------------------------------
def test_corrupt_never_writes_over_a_dataset_it_did_not_write(tmp_path: Path, photo: np.ndarray) -> None:
    source = _dataset(tmp_path / "source", {"images/a.png": _png(photo)})
    theirs = _dataset(tmp_path / "theirs", {"images/b.png": _png(photo[::-1].copy())})
    plain = tmp_path / "plain"
    (plain / "photos").mkdir(parents=True)
    (plain / "photos/c.png").write_bytes(_png(photo))
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    common = ["--types", "fog", "--severities", "1", "--workers", "1", "--no-progress"]
    _one_line_error(_gara("corrupt", "--data", source, "--out", theirs, *common),
                    "holds a dataset that gara corrupt did not write")
    _one_line_error(_gara("corrupt", "--data", source, "--out", plain, *common), "--out is not empty")
    _one_line_error(_gara("corrupt", "--data", plain, "--out", plain / "pairs", *common), "inside it")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot
    # its own earlier output it rewrites
    mine = tmp_path / "mine"
    for _ in range(2):
        assert _gara("corrupt", "--data", source, "--out", mine, *common).exit_code == 0


# --- an explicit --data is evaluated whole ----------------------------------------------------------
def test_an_explicit_data_is_evaluated_whole_whatever_the_pipeline_samples(
        tmp_path: Path, photo: np.ndarray, tiny_sets: list[str]) -> None:
    files = {f"images/{k}.png": _png(np.roll(photo, 7 * k, axis=1)) for k in range(4)}
    root = _dataset(tmp_path / "clean", files)  # a clean set: no corruption tags at all
    pipeline = tmp_path / "params.yaml"
    pipeline.write_text("evaluate:\n  max_images: 2\n  types: [fog]\n  severities: [3, 5]\n",
                        encoding="utf-8")
    result = _gara("evaluate", "--model", "base", "--data", root, "--out", tmp_path / "all",
                   "--params", pipeline, "--no-progress", *tiny_sets)
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "all/records.csv")["image_id"].nunique() == 4
    result = _gara("evaluate", "--model", "base", "--data", root, "--out", tmp_path / "two",
                   "--params", pipeline, "--max-images", "2", "--no-progress", *tiny_sets)
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "two/records.csv")["image_id"].nunique() == 2


# --- an interrupted run leaves no process behind ----------------------------------------------------
def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_sigkilled_corrupt_leaves_no_worker_processes(tmp_path: Path, photo: np.ndarray) -> None:
    files = {f"images/{k}.png": _png(np.roll(photo, 5 * k, axis=0)) for k in range(12)}
    root = _dataset(tmp_path / "data", files)
    proc = subprocess.Popen([sys.executable, "-m", "gara.cli", "corrupt", "--data", str(root), "--out",
                             str(tmp_path / "out"), "--workers", "2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any((tmp_path / "out/images").rglob("*.png")):
            assert proc.poll() is None, "corrupt ended before it was killed"
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # the pool (and multiprocessing's resource tracker)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived their killed parent: {left}"


def test_corrupt_on_s3_applies_the_same_rules(s3_env, tmp_path: Path, photo: np.ndarray) -> None:
    """An s3:// input is checked by the same rules, image by image as it is read; an s3:// --out
    holding other objects, or another dataset, is refused and left as it was."""
    client, bucket = s3_env.client(), s3_env.new_bucket()
    good = _dataset(tmp_path / "good", {"images/a.png": _png(photo)})
    bad, where = case_zero_bytes(tmp_path / "bad", photo)
    for root in (good, bad):
        for path in root.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{root.name}/{path.relative_to(root).as_posix()}")
    client.put_object(Bucket=bucket, Key="theirs/notes.txt", Body=b"keep me")
    client.put_object(Bucket=bucket, Key="other/annotations.json", Body=b'{"images": [], "annotations": []}')
    common = ["--types", "fog", "--severities", "1", "--workers", "1", "--no-progress"]
    _one_line_error(_gara("corrupt", "--data", f"s3://{bucket}/bad", "--out", f"s3://{bucket}/out", *common),
                    where)
    _one_line_error(_gara("corrupt", "--data", f"s3://{bucket}/good", "--out", f"s3://{bucket}/theirs",
                          *common), "--out is not empty (it holds notes.txt")
    _one_line_error(_gara("corrupt", "--data", f"s3://{bucket}/good", "--out", f"s3://{bucket}/other",
                          *common), "holds a dataset that gara corrupt did not write")
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert not any(key.startswith(("out/", "theirs/images", "other/images")) for key in listed), listed
    for _ in range(2):  # a new prefix, then its own output again
        result = _gara("corrupt", "--data", f"s3://{bucket}/good", "--out", f"s3://{bucket}/new", *common)
        assert result.exit_code == 0, result.output


def test_weak_label_sets_follow_the_same_rules(tmp_path: Path, photo: np.ndarray) -> None:
    """WeSAM reads boxes without masks (its own loader): ids, paths and the reader are the same."""
    from gara.data.weak_labels import WeakLabelDataset

    boxes_only = [{k: v for k, v in _ann(1, 1).items() if k != "segmentation"}]
    root, _ = case_duplicate_ids(tmp_path / "dup", photo)
    with pytest.raises(ValueError, match="image id 1 is used by images/a.png and images/b.png"):
        WeakLabelDataset(root)
    root, _ = case_dotdot(tmp_path / "dotdot", photo)
    with pytest.raises(ValueError, match="points outside the dataset"):
        WeakLabelDataset(root)
    rotated = _dataset(tmp_path / "rotated", {"images/a.png": _png(np.rot90(photo, k=1), orientation=6)},
                       None, boxes_only)
    np.testing.assert_array_equal(WeakLabelDataset(rotated)[0]["image"], photo)

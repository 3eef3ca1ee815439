"""The corruption generator: per-image corruptions and the dataset-level writer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from typer.testing import CliRunner

from gara.cli import app
from gara.data import corrupt as corrupt_mod
from gara.data.coco import annotation_mask, mask_bbox, mask_to_rle, read_coco, write_coco
from gara.data.corrupt import corrupt_dataset, render_contact_sheet
from gara.data.corruptions import (
    CORRUPTION_NAMES,
    GEOMETRIC_NAMES,
    LEVELS,
    apply_corruption,
    resolve_types,
)

EXPECTED = (
    "snow", "fog", "rain", "gaussian_noise", "iso_noise", "impulse_noise", "resampling_blur",
    "motion_blur", "zoom_blur", "color_jitter", "jpeg", "elastic", "frosted_glass", "brightness",
    "contrast", "low_light", "night",
)
# Types whose main effect is removing detail: judged by high-frequency energy, not by distance.
BLUR_TYPES = ("resampling_blur", "motion_blur", "zoom_blur")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo (skimage's astronaut) at 96 px: texture for blur/noise statistics."""
    return cv2.resize(skimage.data.astronaut(), (96, 96), interpolation=cv2.INTER_AREA)


def _square_scene(rng: np.random.Generator, h: int = 96, w: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Grey textured background with a pure red square off-centre, and the square's mask."""
    img = rng.integers(40, 90, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[14:44, 50:80] = True
    img[mask] = (255, 0, 0)
    return img, mask


def _hf_energy(img: np.ndarray) -> float:
    """Mean |Laplacian| of the grey image: high-frequency detail, which blur removes."""
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.abs(cv2.Laplacian(grey, cv2.CV_32F)).mean())


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _make_dataset(root: Path, n_images: int = 3, h: int = 64, w: int = 80) -> Path:
    """A tiny dataset in the project format: PNG images + COCO with RLE and polygon masks."""
    rng = np.random.default_rng(7)
    images, anns = [], []
    for i in range(1, n_images + 1):
        img = rng.integers(30, 100, size=(h, w, 3), dtype=np.uint8)
        m1 = np.zeros((h, w), bool)
        m1[10 + i : 30 + i, 12:40] = True
        img[m1] = (230, 40, 40)
        name = f"images/img{i:02d}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), img[..., ::-1])
        images.append({"id": 100 + i, "file_name": name, "height": h, "width": w})
        anns.append({
            "id": 10 * i, "image_id": 100 + i, "category_id": 1, "iscrowd": 0,
            "segmentation": mask_to_rle(m1), "bbox": mask_bbox(m1), "area": float(m1.sum()),
        })
        poly = [50.0, 35.0, 70.0, 35.0, 70.0, 55.0, 50.0, 55.0]
        anns.append({
            "id": 10 * i + 1, "image_id": 100 + i, "category_id": 2, "iscrowd": 0,
            "segmentation": [poly], "bbox": [50.0, 35.0, 20.0, 20.0], "area": 400.0,
        })
    write_coco(root, {
        "images": images, "annotations": anns,
        "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "patch"}],
    })
    return root


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- per-image corruptions ---------------------------------------------------------------


def test_registry_has_the_17_types_in_protocol_order() -> None:
    assert CORRUPTION_NAMES == EXPECTED
    assert set(GEOMETRIC_NAMES) == {"zoom_blur", "elastic", "frosted_glass"}
    for name in EXPECTED:
        assert len(LEVELS[name]) == 5, name


def test_same_inputs_same_bytes_other_seed_or_key_other_bytes(photo: np.ndarray) -> None:
    for name in CORRUPTION_NAMES:
        a, _ = apply_corruption(photo, name, 3, seed=1, key="x.jpg")
        b, _ = apply_corruption(photo, name, 3, seed=1, key="x.jpg")
        assert a.tobytes() == b.tobytes(), name
        if name in ("resampling_blur", "jpeg"):  # no randomness / only 6 quality levels at s3
            continue
        c, _ = apply_corruption(photo, name, 3, seed=2, key="x.jpg")
        d, _ = apply_corruption(photo, name, 3, seed=1, key="y.jpg")
        assert a.tobytes() != c.tobytes(), name
        assert a.tobytes() != d.tobytes(), name


@pytest.mark.parametrize("name", EXPECTED)
def test_each_type_changes_the_image_and_s5_degrades_more_than_s1(
    photo: np.ndarray, name: str
) -> None:
    """Blur types: s5 keeps less high-frequency energy (mean |Laplacian|) than s1.
    All others: s5 is farther from the clean image (mean absolute difference) than s1.
    Averaged over 3 seeds, since parameters are drawn per image."""
    s1 = [apply_corruption(photo, name, 1, seed=k)[0] for k in range(3)]
    s5 = [apply_corruption(photo, name, 5, seed=k)[0] for k in range(3)]
    for out in s1 + s5:
        assert out.shape == photo.shape and out.dtype == np.uint8
        assert _mad(out, photo) > 0.5, f"{name} barely changed the image"
    if name in BLUR_TYPES:
        hf1 = np.mean([_hf_energy(x) for x in s1])
        hf5 = np.mean([_hf_energy(x) for x in s5])
        assert hf5 < 0.8 * hf1 < 0.8 * _hf_energy(photo), (name, hf1, hf5)
    else:
        d1 = np.mean([_mad(x, photo) for x in s1])
        d5 = np.mean([_mad(x, photo) for x in s5])
        assert d5 > 1.3 * d1, (name, d1, d5)


@pytest.mark.parametrize("name", GEOMETRIC_NAMES)
def test_geometric_types_warp_masks_with_the_image(name: str) -> None:
    """The red pixels after the warp match the warped mask, and clearly not the original one."""
    img, mask = _square_scene(np.random.default_rng(0))
    for seed in range(2):
        out, warped = apply_corruption(img, name, 5, seed=seed, masks=mask[None])
        assert warped is not None and warped.shape == (1, *mask.shape) and warped.dtype == bool
        # "red" = more than half-way from the grey background (R-G ~ 0) to the square (R-G 255):
        # the same 0.5 rule the generator uses for blended mask values
        red = (out[..., 0].astype(int) - out[..., 1].astype(int)) > 127
        iou_warped, iou_orig = _iou(red, warped[0]), _iou(red, mask)
        assert iou_warped > 0.9, (name, iou_warped)
        assert iou_warped > iou_orig + 0.2, (name, iou_warped, iou_orig)


def test_photometric_types_return_masks_unchanged(photo: np.ndarray) -> None:
    masks = np.zeros((2, 96, 96), bool)
    masks[0, 10:20, 10:30] = True
    for name in CORRUPTION_NAMES:
        if name in GEOMETRIC_NAMES:
            continue
        _, out = apply_corruption(photo, name, 5, seed=0, masks=masks)
        assert out is not None and np.array_equal(out, masks), name


def test_bad_arguments_name_the_value(photo: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"'hail'.*snow"):
        apply_corruption(photo, "hail", 3, seed=0)
    for bad in (0, 6):
        with pytest.raises(ValueError, match=rf"severity {bad}.*1, 2, 3, 4, 5"):
            apply_corruption(photo, "fog", bad, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        apply_corruption(photo.astype(np.float32), "fog", 3, seed=0)
    with pytest.raises(ValueError, match="masks must have shape"):
        apply_corruption(photo, "elastic", 3, seed=0, masks=np.zeros((1, 5, 5), bool))


# --- dataset level -----------------------------------------------------------------------

SMALL = dict(types=["snow", "gaussian_noise", "elastic", "zoom_blur", "night"], severities=[1, 4])


def test_dataset_output_format(tmp_path: Path) -> None:
    data = _make_dataset(tmp_path / "data")
    summary = corrupt_dataset(data, tmp_path / "out", **SMALL, seed=3, workers=1, progress=False)
    coco = read_coco(tmp_path / "out")
    assert summary.source_images == 3 and summary.images == 3 * (1 + 5 * 2) == len(coco["images"])
    assert [e["id"] for e in coco["images"]] == list(range(1, summary.images + 1))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    assert len(coco["annotations"]) + summary.dropped_instances == 2 * summary.images
    clean = [e for e in coco["images"] if e["corruption"] == "clean"]
    assert [e["file_name"] for e in clean] == [f"images/clean/img0{i}.png" for i in (1, 2, 3)]
    assert all(e["severity"] == 0 for e in clean)
    assert {e["source_image_id"] for e in coco["images"]} == {101, 102, 103}
    entry = next(e for e in coco["images"] if e["corruption"] == "elastic" and e["severity"] == 4)
    assert entry["file_name"] == "images/elastic/s4/img01.png"
    for e in coco["images"]:
        img = cv2.imread(str(tmp_path / "out" / e["file_name"]))
        assert img is not None and img.shape == (64, 80, 3)
    # clean copies are lossless
    src = cv2.imread(str(data / "images/img02.png"))
    assert np.array_equal(cv2.imread(str(tmp_path / "out/images/clean/img02.png")), src)
    # geometric types: RLE re-encoded, bbox/area recomputed from the warped mask
    by_image = {e["id"]: e for e in coco["images"]}
    for ann in coco["annotations"]:
        e = by_image[ann["image_id"]]
        assert ann["source_annotation_id"] // 10 == e["source_image_id"] - 100
        if e["corruption"] in ("elastic", "zoom_blur"):
            m = annotation_mask(ann, 64, 80)
            assert isinstance(ann["segmentation"], dict)
            assert ann["bbox"] == mask_bbox(m) and ann["area"] == float(m.sum()) > 0
        elif ann["category_id"] == 2:
            assert isinstance(ann["segmentation"], list)  # photometric: polygons kept as given


def test_two_runs_and_one_vs_two_workers_give_identical_bytes(tmp_path: Path) -> None:
    data = _make_dataset(tmp_path / "data")
    corrupt_dataset(data, tmp_path / "a", **SMALL, seed=5, workers=1, progress=False)
    corrupt_dataset(data, tmp_path / "b", **SMALL, seed=5, workers=1, progress=False)
    corrupt_dataset(data, tmp_path / "c", **SMALL, seed=5, workers=2, progress=False)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert len(a) > 30 and "annotations.json" in a
    assert a == b
    assert a == c


def test_rerun_skips_and_changed_seed_or_file_regenerates(tmp_path: Path) -> None:
    data = _make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    first = corrupt_dataset(data, out, **SMALL, seed=1, workers=1, progress=False)
    assert first.written == first.images and first.skipped == 0
    pngs = sorted(out.glob("images/**/*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in pngs}
    ann_bytes = (out / "annotations.json").read_bytes()

    again = corrupt_dataset(data, out, **SMALL, seed=1, workers=1, progress=False)
    assert again.written == 0 and again.skipped == first.images
    assert {p: p.stat().st_mtime_ns for p in pngs} == mtimes
    assert (out / "annotations.json").read_bytes() == ann_bytes

    victim = out / "images/snow/s4/img02.png"
    victim.write_bytes(b"not the png we wrote")
    repaired = corrupt_dataset(data, out, **SMALL, seed=1, workers=1, progress=False)
    assert repaired.written == 1 and cv2.imread(str(victim)) is not None

    old = victim.read_bytes()
    reseeded = corrupt_dataset(data, out, **SMALL, seed=2, workers=1, progress=False)
    assert reseeded.skipped == 0 and reseeded.written == first.images
    assert victim.read_bytes() != old


def test_variants_per_image_samples_deterministically(tmp_path: Path) -> None:
    data = _make_dataset(tmp_path / "data")

    def pairs(out: str, seed: int) -> list[list[tuple[str, int]]]:
        corrupt_dataset(data, tmp_path / out, seed=seed, variants_per_image=2, progress=False,
                        workers=1)
        coco = read_coco(tmp_path / out)
        per_src: dict[int, list[tuple[str, int]]] = {}
        for e in coco["images"]:
            per_src.setdefault(e["source_image_id"], []).append((e["corruption"], e["severity"]))
        return [per_src[k] for k in sorted(per_src)]

    a, b, c = pairs("a", 0), pairs("b", 0), pairs("c", 1)
    assert a == b
    assert a != c
    for variants in a:
        assert variants[0] == ("clean", 0) and len(set(variants)) == 3
    # a new seed drew other pairs: the old files are gone, only the listed ones remain
    pairs("a", 1)
    listed = {e["file_name"] for e in read_coco(tmp_path / "a")["images"]}
    on_disk = {str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").glob("images/**/*.png")}
    assert on_disk == listed
    with pytest.raises(ValueError, match="variants_per_image 86"):
        corrupt_dataset(data, tmp_path / "d", variants_per_image=86, progress=False)


def test_balanced_variants_spread_every_type_evenly_over_the_images(tmp_path: Path) -> None:
    from collections import Counter

    from gara.data.corrupt import balanced_order, plan_balanced

    types, severities = ["fog", "snow", "jpeg", "night", "rain"], [1, 3, 5]
    order = balanced_order(types, severities, seed=0)
    assert sorted(order) == sorted((t, s) for t in types for s in severities)  # every cell once
    full = [plan_balanced(i, order, 3) for i in range(12)]  # 12 images x 3 variants
    plans = [plan[1:] for plan in full]
    for plan in full:
        assert plan[0] == ("clean", 0)
        assert len({t for t, _ in plan[1:]}) == 3  # three different types on one image
    per_type = Counter(t for plan in plans for t, _ in plan)
    assert set(per_type.values()) <= {7, 8} and sum(per_type.values()) == 36
    for t in types:  # a type's severities are spread, not all the same
        assert len({s for plan in plans for u, s in plan if u == t}) == len(severities)

    data = _make_dataset(tmp_path / "data")
    corrupt_dataset(data, tmp_path / "out", types=types, severities=severities, variants_per_image=2,
                    balanced=True, workers=1, progress=False)
    coco = read_coco(tmp_path / "out")
    written = [(e["corruption"], e["severity"]) for e in coco["images"] if e["corruption"] != "clean"]
    sources = sorted({e["source_image_id"] for e in coco["images"]})
    dealt = balanced_order(resolve_types(types), severities, seed=0)  # the protocol's type order
    assert written == [cell for i in range(len(sources)) for cell in plan_balanced(i, dealt, 2)[1:]]
    assert coco["corruption"]["balanced"] is True
    with pytest.raises(ValueError, match="balanced needs variants_per_image"):
        corrupt_dataset(data, tmp_path / "grid", balanced=True, progress=False)


def test_vanished_instance_is_dropped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _make_dataset(tmp_path / "data", n_images=1)
    coco = read_coco(data)
    corner = np.zeros((64, 80), bool)
    corner[0:2, 0:2] = True  # zoom blur pushes it out of the frame
    coco["annotations"].append({
        "id": 99, "image_id": 101, "category_id": 1, "iscrowd": 0,
        "segmentation": mask_to_rle(corner), "bbox": mask_bbox(corner), "area": 4.0,
    })
    write_coco(data, coco)
    with caplog.at_level(logging.WARNING, logger="gara.data.corrupt"):
        summary = corrupt_dataset(data, tmp_path / "out", types=["zoom_blur"], severities=[5],
                                  workers=1, progress=False)
    assert summary.dropped_instances == 1
    assert summary.dropped == [{"source_image_id": 101, "source_annotation_id": 99,
                                "corruption": "zoom_blur", "severity": 5}]
    assert "instance 99" in caplog.text
    out = read_coco(tmp_path / "out")
    assert out["corruption"]["dropped_instances"] == 1
    sources = [a["source_annotation_id"] for a in out["annotations"]]
    assert sources.count(99) == 1  # kept on the clean copy only


def test_interrupted_run_leaves_no_annotations_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    corrupt_dataset(data, out, types=["brightness"], severities=[1], workers=1, progress=False)
    assert (out / "annotations.json").is_file()
    real = corrupt_mod._process_image
    calls = []

    def dies_on_second(task):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(corrupt_mod, "_process_image", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        corrupt_dataset(data, out, types=["brightness"], severities=[1], seed=9, workers=1,
                        progress=False)
    assert not (out / "annotations.json").exists()


def test_bad_dataset_arguments_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        corrupt_dataset(tmp_path / "nowhere", tmp_path / "out", progress=False)
    data = _make_dataset(tmp_path / "data", n_images=1)
    with pytest.raises(ValueError, match="'hail'"):
        corrupt_dataset(data, tmp_path / "out", types=["fog", "hail"], progress=False)
    with pytest.raises(ValueError, match="severity 7"):
        corrupt_dataset(data, tmp_path / "out", severities=[1, 7], progress=False)
    runner = CliRunner()
    res = runner.invoke(app, ["corrupt", "--data", str(data), "--out", str(tmp_path / "o"),
                              "--types", "fog,hail"])
    assert res.exit_code == 2 and "'hail'" in res.output
    res = runner.invoke(app, ["corrupt", "--data", str(tmp_path / "missing"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing" in res.output


def test_cli_corrupt_and_contact_sheet(tmp_path: Path) -> None:
    data = _make_dataset(tmp_path / "data", n_images=2)
    params = tmp_path / "params.yaml"
    params.write_text("corrupt:\n  seed: 4\n  types: [jpeg, elastic]\n  severities: [2]\n")
    runner = CliRunner()
    res = runner.invoke(app, ["corrupt", "--data", str(data), "--out", str(tmp_path / "out"),
                              "--params", str(params), "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "6 images (2 sources)" in res.output
    meta = json.loads((tmp_path / "out/annotations.json").read_text())["corruption"]
    assert meta["seed"] == 4 and meta["types"] == ["jpeg", "elastic"] and meta["severities"] == [2]

    sheet = tmp_path / "sheet.png"
    res = runner.invoke(app, ["contact-sheet", "--image", str(data / "images/img01.png"),
                              "--out", str(sheet), "--types", "fog,rain,night",
                              "--severities", "1,5", "--cell", "64"])
    assert res.exit_code == 0, res.output
    img = cv2.imread(str(sheet))
    # header + 3 rows of 64 px tiles (+4 px gaps); label column + clean + 2 severities
    assert img.shape[:2] == (28 + 3 * (51 + 4), 150 + 3 * (64 + 4))
    direct = render_contact_sheet(data / "images/img01.png", tmp_path / "again.png",
                                  ["fog", "rain", "night"], [1, 5], seed=0, cell=64)
    assert direct.read_bytes() == sheet.read_bytes()

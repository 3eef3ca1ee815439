"""`gara data import`: every format from a small fixture written here, through the CLI, checked
against the fixture's own masks; the writer's guarantees (refusal, atomic replace, path safety);
and one real evaluation of each imported dataset."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gara.cli import app
from gara.data.coco import annotation_mask, mask_bbox, mask_to_rle
from gara.data.validate import validate_dataset
from tests.conftest import write_dataset

H, W = 48, 64
Expected = dict[str, list[Any]]  # output file_name -> masks in order (an array, or (mask, min IoU))


# --- fixture helpers -------------------------------------------------------------------------


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def poly_mask(*polygons: list[float]) -> np.ndarray:
    """How pycocotools rasterises COCO polygons (the reference for polygon formats)."""
    return annotation_mask({"segmentation": list(polygons)}, H, W)


def save_picture(path: Path, masks: list[np.ndarray], seed: int = 0) -> Path:
    """A dark picture with each object bright (a different tint each)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(10, 40, size=(H, W, 3), dtype=np.uint8)
    for k, mask in enumerate(masks):
        rgb[mask] = (220, 120 + 40 * (k % 3), 60 + 50 * (k % 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's crowd form: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}


def run_import(*args: Any) -> Any:
    return CliRunner().invoke(app, ["data", "import", *map(str, args), "--no-progress"])


def load(out: Path) -> dict[str, Any]:
    return json.loads((out / "annotations.json").read_text())


def check_import(out: Path, expected: Expected) -> dict[str, Any]:
    """The output validates and holds exactly the expected images, each with the expected masks."""
    assert validate_dataset(out) == []
    coco = load(out)
    entries = {e["file_name"]: e for e in coco["images"]}
    assert sorted(entries) == sorted(expected)
    for name, wanted in expected.items():
        entry = entries[name]
        anns = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
        assert len(anns) == len(wanted), name
        for ann, want in zip(anns, wanted, strict=True):
            got = annotation_mask(ann, entry["height"], entry["width"])
            mask, min_iou = want if isinstance(want, tuple) else (want, 1.0)
            if min_iou == 1.0:
                assert np.array_equal(got, mask), (name, ann["id"])
            else:
                assert (got & mask).sum() / (got | mask).sum() >= min_iou, (name, ann["id"])
    return coco


# --- one fixture per format: (CLI args after --format, expected output, source image count) ----


def make_coco(root: Path) -> tuple[list[Any], Expected, int]:
    """COCO layout: annotations/instances_val2017.json with images in ../val2017 (found without
    --images); a polygon, a compressed RLE, a crowd uncompressed RLE and a two-part polygon."""
    a_poly = [5.0, 5.0, 30.0, 5.0, 30.0, 25.0, 5.0, 25.0]
    a_ell = ellipse(45, 30, 12, 9)
    b_crowd = rect(2, 30, 20, 46)
    b_parts = [[30.0, 5.0, 50.0, 5.0, 40.0, 20.0], [52.0, 22.0, 62.0, 22.0, 62.0, 40.0]]
    save_picture(root / "val2017/000000000397.jpg", [poly_mask(a_poly), a_ell])
    save_picture(root / "val2017/000000000042.jpg", [b_crowd, poly_mask(*b_parts)], seed=1)
    coco = {
        "images": [{"id": 397, "file_name": "000000000397.jpg", "height": H, "width": W, "license": 3},
                   {"id": 42, "file_name": "000000000042.jpg", "height": H, "width": W}],
        "annotations": [
            {"id": 7, "image_id": 397, "category_id": 3, "segmentation": [a_poly], "iscrowd": 0,
             "bbox": [5, 5, 25, 20], "area": 500.0},
            {"id": 9, "image_id": 397, "category_id": 18, "segmentation": mask_to_rle(a_ell), "iscrowd": 0,
             "bbox": [0, 0, 1, 1], "area": 1.0},
            {"id": 12, "image_id": 42, "category_id": 3, "segmentation": uncompressed_rle(b_crowd),
             "iscrowd": 1, "bbox": [2, 30, 18, 16], "area": 288.0},
            {"id": 15, "image_id": 42, "category_id": 18, "segmentation": b_parts, "iscrowd": 0,
             "bbox": [30, 5, 32, 35], "area": 300.0},
        ],
        "categories": [{"id": 3, "name": "car", "supercategory": "vehicle"}, {"id": 18, "name": "dog"}],
    }
    src = root / "annotations/instances_val2017.json"
    src.parent.mkdir(parents=True)
    src.write_text(json.dumps(coco))
    expected = {"images/000000000397.jpg": [poly_mask(a_poly), a_ell],
                "images/000000000042.jpg": [b_crowd, poly_mask(*b_parts)]}
    return [src], expected, 2


def make_lvis(root: Path) -> tuple[list[Any], Expected, int]:
    """LVIS v1: no file_name, coco_url only; one image under <images>/val2017/, one flat."""
    polys = [[4.0, 4.0, 40.0, 6.0, 20.0, 40.0], [10.0, 10.0, 60.0, 10.0, 60.0, 30.0, 10.0, 30.0]]
    save_picture(root / "coco/val2017/000000000139.jpg", [poly_mask(polys[0])])
    save_picture(root / "coco/000000000285.jpg", [poly_mask(polys[1])], seed=2)
    url = "http://images.cocodataset.org/{}/{}"
    lvis = {
        "images": [
            {"id": 139, "coco_url": url.format("val2017", "000000000139.jpg"), "height": H, "width": W,
             "neg_category_ids": [], "not_exhaustive_category_ids": [2]},
            {"id": 285, "coco_url": url.format("train2017", "000000000285.jpg"), "height": H, "width": W,
             "neg_category_ids": [1], "not_exhaustive_category_ids": []},
        ],
        "annotations": [
            {"id": 1, "image_id": 139, "category_id": 1, "segmentation": [polys[0]], "bbox": [4, 4, 36, 36],
             "area": 600.0},
            {"id": 2, "image_id": 285, "category_id": 2, "segmentation": [polys[1]], "bbox": [10, 10, 50, 20],
             "area": 1000.0},
        ],
        "categories": [
            {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"], "frequency": "c"},
            {"id": 2, "name": "air_conditioner", "synonyms": ["air_conditioner"], "frequency": "f"},
        ],
    }
    src = root / "lvis_v1_val.json"
    src.write_text(json.dumps(lvis))
    expected = {"images/val2017/000000000139.jpg": [poly_mask(polys[0])],
                "images/train2017/000000000285.jpg": [poly_mask(polys[1])]}
    return [src, "--images", root / "coco"], expected, 2


LABELME_POLY = [[5.0, 5.0], [25.0, 4.0], [28.0, 20.0], [6.0, 22.0]]
LABELME_PARTS = [[[40.0, 30.0], [50.0, 30.0], [45.0, 40.0]], [[52.0, 30.0], [62.0, 30.0], [57.0, 44.0]]]


def _flat(points: list[list[float]]) -> list[float]:
    return [v for p in points for v in p]


def make_labelme(root: Path) -> tuple[list[Any], Expected, int]:
    """a.json beside a.png: polygon, rectangle, circle, a line (skipped), two shapes of one group;
    sub/b.json with no imagePath and the image embedded as imageData; ann/c.json -> ../pics/c.png."""
    src = root / "lm"
    rectangle = [[33.0, 6.0], [58.0, 18.0]]  # corners, drawn right-to-left would swap them
    circle = [[14.0, 34.0], [14.0, 43.0]]  # centre, rim point: radius 9
    masks_a = [poly_mask(_flat(LABELME_POLY)), poly_mask([33.0, 6.0, 58.0, 6.0, 58.0, 18.0, 33.0, 18.0]),
               (ellipse(14, 34, 9, 9), 0.85), poly_mask(*map(_flat, LABELME_PARTS))]
    save_picture(src / "a.png", [m if isinstance(m, np.ndarray) else m[0] for m in masks_a])

    def shape(label: str, points: list, kind: str, group: int | None = None) -> dict[str, Any]:
        return {"label": label, "points": points, "group_id": group, "shape_type": kind, "flags": {}}

    doc_a = {"version": "5.4.1", "flags": {}, "imagePath": "a.png", "imageData": None,
             "imageHeight": H, "imageWidth": W,
             "shapes": [shape("cat", LABELME_POLY, "polygon"), shape("box", rectangle[::-1], "rectangle"),
                        shape("ball", circle, "circle"), shape("crack", [[0, 0], [30, 30]], "line"),
                        shape("cat", LABELME_PARTS[0], "polygon", 1),
                        shape("cat", LABELME_PARTS[1], "polygon", 1)]}
    (src / "a.json").write_text(json.dumps(doc_a))
    dog = [[10.0, 10.0], [50.0, 12.0], [30.0, 40.0]]
    buf = io.BytesIO()
    save_picture(root / "tmp.png", [poly_mask(_flat(dog))], seed=3)
    buf.write((root / "tmp.png").read_bytes())
    (root / "tmp.png").unlink()
    doc_b = {"version": "5.4.1", "imagePath": None, "imageData": base64.b64encode(buf.getvalue()).decode(),
             "imageHeight": H, "imageWidth": W, "shapes": [shape("dog", dog, None)]}
    (src / "sub").mkdir()
    (src / "sub/b.json").write_text(json.dumps(doc_b))
    # the common project layout: JSONs in one folder, images in a sibling one ("../pics/c.png")
    save_picture(src / "pics/c.png", [poly_mask(_flat(dog))], seed=4)
    (src / "ann").mkdir()
    (src / "ann/c.json").write_text(json.dumps({**doc_b, "imagePath": "../pics/c.png", "imageData": None}))
    expected = {"images/a.png": masks_a, "images/sub/b.png": [poly_mask(_flat(dog))],
                "images/pics/c.png": [poly_mask(_flat(dog))]}
    return [src], expected, 3


def make_sa1b(root: Path) -> tuple[list[Any], Expected, int]:
    src, expected = root / "sa1b", {}
    for n, masks in ((1, [ellipse(20, 20, 10, 8), rect(35, 5, 60, 40)]), (2, [rect(3, 3, 15, 44)])):
        save_picture(src / f"sa_{n}.jpg", masks, seed=n)
        anns = [{"id": 1000 * n + k, "segmentation": mask_to_rle(m), "bbox": [0, 0, 1, 1], "area": 1,
                 "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [[10.0, 10.0]],
                 "crop_box": [0, 0, W, H]} for k, m in enumerate(masks)]
        image = {"image_id": n, "width": W, "height": H, "file_name": f"sa_{n}.jpg"}
        doc = {"image": image, "annotations": anns}
        (src / f"sa_{n}.json").write_text(json.dumps(doc))
        expected[f"images/sa_{n}.jpg"] = masks
    return [src], expected, 2


ROBUST_FOLDERS = {"fog": "fog", "gauss_noise": "gaussian_noise", "compression": "jpeg",
                  "elastic_transform": "elastic", "haze": "haze"}


def make_robustseg(root: Path) -> tuple[list[Any], Expected, int]:
    """x1 with masks/x1.npy (K, H, W), x2 with a masks/x2.png label map; x2 has no haze copy."""
    src, expected = root / "robust/val", {}
    x1 = [ellipse(18, 20, 12, 10), rect(36, 8, 60, 40)]
    x2 = [rect(4, 4, 30, 30), ellipse(46, 30, 10, 12)]
    (src / "masks").mkdir(parents=True)
    np.save(src / "masks/x1.npy", np.stack(x1))
    Image.fromarray((x2[0] * 1 + x2[1] * 2).astype(np.uint8)).save(src / "masks/x2.png")
    for stem, masks in (("x1", x1), ("x2", x2)):
        for folder in ["clear", *ROBUST_FOLDERS]:
            if (stem, folder) == ("x2", "haze"):
                continue
            save_picture(src / folder / f"{stem}.jpg", masks, seed=len(folder))
            expected[f"images/{folder}/{stem}.jpg"] = masks
    return [src], expected, 2


def make_cityscapes(root: Path) -> tuple[list[Any], Expected, int]:
    """gtFine/val/aachen: a Cityscapes frame (two cars, a person, road stuff) and an ACDC-named
    frame (a bicycle, an unknown class 45), 16-bit PNGs; images under leftImg8bit/val/aachen."""
    src, images = root / "gtFine/val", root / "leftImg8bit/val"
    car1, car2, person = rect(2, 30, 20, 46), rect(24, 30, 44, 46), ellipse(52, 14, 6, 10)
    ids = np.zeros((H, W), np.uint16)
    ids[:25, :40] = 7  # road: stuff, no instance
    ids[car1], ids[car2], ids[person] = 26000, 26001, 24002
    bike, thing = ellipse(20, 20, 14, 10), rect(44, 4, 62, 44)
    ids2 = np.zeros((H, W), np.uint16)
    ids2[bike], ids2[thing] = 33005, 45001
    (src / "aachen").mkdir(parents=True)
    Image.fromarray(ids).save(src / "aachen/aachen_000000_000019_gtFine_instanceIds.png")
    Image.fromarray(ids2).save(src / "aachen/GOPR0475_frame_000041_gt_instanceIds.png")
    save_picture(images / "aachen/aachen_000000_000019_leftImg8bit.png", [car1, car2, person])
    save_picture(images / "aachen/GOPR0475_frame_000041_rgb_anon.png", [bike, thing], seed=5)
    expected = {"images/aachen/aachen_000000_000019_leftImg8bit.png": [person, car1, car2],
                "images/aachen/GOPR0475_frame_000041_rgb_anon.png": [bike, thing]}
    return [src, "--images", images], expected, 2


BUILDERS: dict[str, Callable[[Path], tuple[list[Any], Expected, int]]] = {
    "coco": make_coco, "lvis": make_lvis, "labelme": make_labelme, "sa1b": make_sa1b,
    "robustseg": make_robustseg, "cityscapes": make_cityscapes,
}


def imported(fmt: str, root: Path) -> tuple[Path, Any, Expected, int]:
    args, expected, sources = BUILDERS[fmt](root)
    out = root / "out"
    result = run_import("--format", fmt, *args, "--out", out)
    assert result.exit_code == 0, result.output
    n_instances = sum(len(v) for v in expected.values())
    assert f": {len(expected)} images, {n_instances} instances" in result.output
    return out, result, expected, sources


# --- per format ------------------------------------------------------------------------------


def test_coco(tmp_path: Path) -> None:
    out, result, expected, _ = imported("coco", tmp_path)
    src = tmp_path / "annotations/instances_val2017.json"
    assert result.output.startswith(f"imported coco {src} -> {out}: 2 images, 4 instances, 2 categories; "
                                    "skipped 0\n")
    coco = check_import(out, expected)
    assert sorted(e["id"] for e in coco["images"]) == [42, 397]  # COCO ids kept
    assert [a["id"] for a in coco["annotations"]] == [7, 9, 12, 15]
    crowd = next(a for a in coco["annotations"] if a["id"] == 12)
    assert crowd["iscrowd"] == 1 and isinstance(crowd["segmentation"]["counts"], list)  # kept as RLE
    assert {c["id"]: c["name"] for c in coco["categories"]} == {3: "car", 18: "dog"}
    assert next(e for e in coco["images"] if e["id"] == 397)["license"] == 3
    assert coco["imported"] == {"format": "coco", "source": str(src)}
    name = "000000000397.jpg"
    assert (out / "images" / name).read_bytes() == (tmp_path / "val2017" / name).read_bytes()


def test_coco_images_elsewhere_and_link(tmp_path: Path) -> None:
    (args, expected, _), pics = make_coco(tmp_path / "src"), tmp_path / "pictures"
    (tmp_path / "src/val2017").rename(pics)
    moved = tmp_path / "labels.json"
    args[0].rename(moved)
    result = run_import("--format", "coco", moved, "--out", tmp_path / "no")  # no image found
    assert result.exit_code == 2
    assert "no image could be imported (2 skipped; first: image 397" in result.output
    assert not (tmp_path / "no").exists()
    result = run_import("--format", "coco", moved, "--images", pics, "--out", tmp_path / "out", "--link")
    assert result.exit_code == 0, result.output
    check_import(tmp_path / "out", expected)
    assert (tmp_path / "out/images/000000000042.jpg").samefile(pics / "000000000042.jpg")  # hard link


def test_lvis(tmp_path: Path) -> None:
    out, _, expected, _ = imported("lvis", tmp_path)
    coco = check_import(out, expected)
    assert [c["name"] for c in coco["categories"]] == ["aerosol_can", "air_conditioner"]
    assert all("coco_url" in e for e in coco["images"])


def test_labelme(tmp_path: Path) -> None:
    out, result, expected, _ = imported("labelme", tmp_path)
    coco = check_import(out, expected)
    assert [c["name"] for c in coco["categories"]] == ["ball", "box", "cat", "dog"]
    assert "  skipped a.json shape 3 (line 'crack'): shape_type 'line' has no area" in result.output
    assert "skipped 1" in result.output.splitlines()[0]
    grouped = [a for a in coco["annotations"] if len(a["segmentation"]) == 2]
    assert len(grouped) == 1 and grouped[0]["segmentation"] == [_flat(p) for p in LABELME_PARTS]


def test_sa1b(tmp_path: Path) -> None:
    out, _, expected, _ = imported("sa1b", tmp_path)
    coco = check_import(out, expected)
    assert coco["categories"] == [{"id": 1, "name": "object"}]
    ann = coco["annotations"][0]
    assert ann["id"] == 1000 and ann["predicted_iou"] == 0.9 and ann["crop_box"] == [0, 0, W, H]
    mask = ellipse(20, 20, 10, 8)
    assert ann["bbox"] == mask_bbox(mask) and ann["area"] == mask.sum()  # from the mask, not the source


def test_robustseg(tmp_path: Path) -> None:
    out, result, expected, _ = imported("robustseg", tmp_path)
    assert "skipped haze/x2" in result.output
    coco = check_import(out, expected)
    by_id = {e["id"]: e for e in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    for entry in coco["images"]:
        folder = entry["file_name"].split("/")[1]
        source = by_id[entry["source_image_id"]]
        assert source["file_name"] == f"images/clear/{Path(entry['file_name']).name}"
        if folder == "clear":
            assert (entry["corruption"], entry["severity"]) == ("clean", 0)
            assert entry["source_image_id"] == entry["id"]
        else:
            assert (entry["corruption"], entry["severity"]) == (ROBUST_FOLDERS[folder], 3)
        for ann in (a for a in coco["annotations"] if a["image_id"] == entry["id"]):
            clean_ann = anns[ann["source_annotation_id"]]
            assert clean_ann["image_id"] == source["id"] and clean_ann["segmentation"] == ann["segmentation"]


def test_cityscapes(tmp_path: Path) -> None:
    out, _, expected, _ = imported("cityscapes", tmp_path)
    coco = check_import(out, expected)
    assert {c["id"]: c["name"] for c in coco["categories"]} == {24: "person", 26: "car", 33: "bicycle",
                                                                45: "class_45"}
    # without --images, the parallel leftImg8bit tree is found
    result = run_import("--format", "cityscapes", tmp_path / "gtFine/val", "--out", tmp_path / "auto")
    assert result.exit_code == 0, result.output
    check_import(tmp_path / "auto", expected)


# --- the writer's guarantees ------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_foreign_output_refused_and_untouched(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "theirs", [(np.zeros((H, W, 3), np.uint8), [rect(1, 1, 9, 9)])])
    before = _tree(out)
    args, _, _ = make_sa1b(tmp_path)
    result = run_import("--format", "sa1b", *args, "--out", out)
    assert result.exit_code == 2 and "did not write" in result.output
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_reimport_replaces_an_import(tmp_path: Path) -> None:
    out, _, _, _ = imported("sa1b", tmp_path)
    args, expected, _ = make_robustseg(tmp_path)
    result = run_import("--format", "robustseg", *args, "--out", out)
    assert result.exit_code == 0, result.output
    check_import(out, expected)
    assert load(out)["imported"]["format"] == "robustseg" and not (out / "images/sa_1.jpg").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_failed_import_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gara.data.importers import writer
    from gara.data.validate import Problem, ProblemKind

    args, _, _ = make_sa1b(tmp_path)
    bad = Problem(ProblemKind.BAD_BBOX, "annotations.json", "injected", image_id=1, ann_id=1000)
    monkeypatch.setattr(writer, "validate_dataset", lambda root: [bad])
    result = run_import("--format", "sa1b", *args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "does not validate" in result.output and "injected" in result.output
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_paths_outside_the_source_are_refused_and_never_read(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pics = tmp_path / "data/pics"
    save_picture(pics / "ok.png", [rect(5, 5, 20, 20)])
    secret = save_picture(tmp_path / "data/secret.png", [rect(5, 5, 20, 20)])
    (pics / "link.png").symlink_to(secret)
    images = [{"id": i, "file_name": name, "height": H, "width": W}
              for i, name in enumerate(["ok.png", "../secret.png", "link.png", str(secret)], start=1)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "segmentation": mask_to_rle(rect(5, 5, 20, 20))}
            for i in range(1, 5)]
    src = tmp_path / "data/labels.json"
    src.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]},
                              indent=1))
    opened: list[str] = []
    real_read, real_copy = Path.read_bytes, shutil.copyfile

    def spy_read(path: Path) -> bytes:  # how the image reader (headers included) reads a file
        opened.append(str(path))
        return real_read(path)

    def spy_copy(source, target, **kwargs):
        opened.append(str(source))
        return real_copy(source, target, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", spy_read)
    monkeypatch.setattr(shutil, "copyfile", spy_copy)
    result = run_import("--format", "coco", src, "--images", pics, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "1 images, 1 instances" in result.output and "skipped 3" in result.output
    for name in ("../secret.png", "link.png", str(secret)):
        assert f"({name}) and its 1 instance(s):" in result.output
    assert "outside" in result.output
    assert any(p.endswith("pics/ok.png") for p in opened)  # the spies see what is read
    assert not any(os.path.realpath(p) == str(secret.resolve()) for p in opened if os.path.exists(p))
    assert [e["file_name"] for e in load(tmp_path / "out")["images"]] == ["images/ok.png"]


def test_bad_input_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_import("--format", "coco", tmp_path / "nowhere.json", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "nowhere.json" in result.output
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = run_import("--format", "coco", broken, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "broken.json: not valid JSON" in result.output
    args, _, _ = make_lvis(tmp_path)  # an LVIS file read as COCO names the key and the fix
    result = run_import("--format", "coco", args[0], "--out", tmp_path / "o")
    assert result.exit_code == 2 and "images[0]: key 'file_name' is missing" in result.output
    assert "--format lvis" in result.output
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm/x.json").write_text(json.dumps({"imagePath": "x.png"}))
    result = run_import("--format", "labelme", tmp_path / "lm", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "x.json: key 'shapes' is missing" in result.output
    result = run_import("--format", "voc", tmp_path / "lm", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "choose one of coco, lvis" in result.output
    assert not (tmp_path / "o").exists()


# --- the real evaluation on each imported dataset ------------------------------------------------


@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_evaluate_imported(fmt: str, tmp_path: Path, tiny_vit_checkpoint,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    out, _, expected, sources = imported(fmt, tmp_path)
    monkeypatch.chdir(tmp_path)  # no ./params.yaml: the built-in defaults plus --set
    report = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "evaluate", "--model", "base", "--data", str(out), "--out", str(report), "--no-progress",
        "--set", "model.backbone=vit_tiny", "--set", f"model.checkpoint={tiny_vit_checkpoint.path}",
        "--set", "evaluate.overlay_images=0"])
    assert result.exit_code == 0, result.output
    counts = json.loads((report / "metrics.json").read_text())["images"]
    assert counts["source_images"] == sources and counts["evaluated"] == len(expected)
    assert counts["instances"] == sum(len(v) for v in expected.values())


def test_bad_images_and_masks_are_skipped_with_reasons(tmp_path: Path) -> None:
    """Validation as it goes: an empty mask, a mask of the wrong size, a stated size the file
    does not have, a truncated image (found by the final decode) are each skipped, not fatal."""
    args, expected, _ = make_sa1b(tmp_path)
    src = args[0]
    doc = json.loads((src / "sa_1.json").read_text())
    doc["annotations"].append({**doc["annotations"][0], "id": 1005,
                               "segmentation": mask_to_rle(rect(0, 0, 0, 0))})
    doc["annotations"].append({**doc["annotations"][0], "id": 1006,
                               "segmentation": mask_to_rle(np.ones((H + 1, W), bool))})
    (src / "sa_1.json").write_text(json.dumps(doc))
    for n, tamper in ((3, "size"), (4, "truncate")):
        picture = save_picture(src / f"sa_{n}.png", [rect(5, 5, 30, 30)])
        if tamper == "truncate":
            picture.write_bytes(picture.read_bytes()[:200])
        width = W + 10 if tamper == "size" else W
        (src / f"sa_{n}.json").write_text(json.dumps({
            "image": {"image_id": n, "width": width, "height": H, "file_name": f"sa_{n}.png"},
            "annotations": [{"id": 1000 * n, "segmentation": mask_to_rle(rect(5, 5, 30, 30))}]}))
    result = run_import("--format", "sa1b", src, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "2 images, 3 instances, 1 categories; skipped 4" in result.output
    assert "skipped instance 1005 of image 1 (sa_1.jpg): empty mask" in result.output
    assert "skipped instance 1006 of image 1 (sa_1.jpg): mask is [49, 64] (HxW) but the image is [48, 64]" \
        in result.output
    assert ("skipped image 3 (sa_3.png) and its 1 instance(s): the file is 64x48 (WxH) but the source "
            "says 74x48") in result.output
    assert "skipped image 4 (sa_4.png)" in result.output and "cannot decode" in result.output
    check_import(tmp_path / "out", expected)


def test_polygons_follow_the_dataset_rules(tmp_path: Path) -> None:
    """The rules every stage applies: a vertex up to 1 px past the border is kept (clipped when
    read), 5 px past or fewer than 3 points is skipped with the validator's reason."""
    pics = tmp_path / "data"
    save_picture(pics / "a.png", [rect(5, 5, 30, 30)])
    near = [-0.4, 5.0, 30.0, 5.0, 30.0, H + 0.4, -0.4, H + 0.4]
    far = [5.0, 5.0, W + 5.0, 5.0, W + 5.0, 30.0, 5.0, 30.0]
    anns = [{"id": k, "image_id": 1, "category_id": 1, "segmentation": [poly]}
            for k, poly in ((1, near), (2, far), (3, [5.0, 5.0, 30.0, 30.0]))]
    src = pics / "labels.json"
    src.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
                               "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    result = run_import("--format", "coco", src, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "1 images, 1 instances" in result.output and "skipped 2" in result.output
    assert ("skipped instance 2 of image 1 (a.png): a polygon reaches 5 px outside the 64x48 image"
            in result.output)
    assert "skipped instance 3 of image 1 (a.png): polygons must be flat lists of >= 3" in result.output
    (kept,) = load(tmp_path / "out")["annotations"]
    assert kept["segmentation"] == [near] and kept["bbox"] == [0.0, 5.0, 30.0, float(H - 5)]
    assert validate_dataset(tmp_path / "out") == []


def test_a_labelme_image_outside_src_comes_from_images_or_imagedata(tmp_path: Path) -> None:
    """labelme's usual `imagePath: ../images/x.png`: the file outside SRC is never read; the
    same name under --images, or the embedded bytes, give the image, named after its JSON."""
    outside = save_picture(tmp_path / "images/x.png", [rect(5, 5, 30, 30)])
    src = tmp_path / "labels"
    src.mkdir()
    doc = {"imagePath": "../images/x.png", "imageData": base64.b64encode(outside.read_bytes()).decode(),
           "imageHeight": H, "imageWidth": W,
           "shapes": [{"label": "x", "points": [[5, 5], [30, 5], [30, 30]], "shape_type": "polygon"}]}
    (src / "x.json").write_text(json.dumps(doc))
    result = run_import("--format", "labelme", src, "--out", tmp_path / "embedded")
    assert result.exit_code == 0 and "1 images, 1 instances" in result.output, result.output
    assert [e["file_name"] for e in load(tmp_path / "embedded")["images"]] == ["images/x.png"]
    (src / "x.json").write_text(json.dumps({**doc, "imageData": None}))
    result = run_import("--format", "labelme", src, "--out", tmp_path / "via-images", "--images",
                        tmp_path / "images")
    assert result.exit_code == 0 and "1 images, 1 instances" in result.output, result.output
    assert (tmp_path / "via-images/images/x.png").read_bytes() == outside.read_bytes()
    result = run_import("--format", "labelme", src, "--out", tmp_path / "neither")
    assert result.exit_code == 2 and "outside" in result.output and not (tmp_path / "neither").exists()


def test_an_interrupted_corrupt_output_is_not_an_import_to_replace(tmp_path: Path) -> None:
    out = tmp_path / "pairs"
    (out / ".records").mkdir(parents=True)
    (out / ".records/a.json").write_text("{}")
    args, _, _ = make_sa1b(tmp_path)
    result = run_import("--format", "sa1b", *args, "--out", out)
    assert result.exit_code == 2 and "--out is not empty" in result.output
    assert (out / ".records/a.json").read_text() == "{}"


def test_a_too_small_image_is_skipped_by_the_shared_rule(tmp_path: Path) -> None:
    pics = tmp_path / "data"
    save_picture(pics / "a.png", [rect(5, 5, 30, 30)])
    Image.new("RGB", (20, 20)).save(pics / "tiny.png")
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W},
              {"id": 2, "file_name": "tiny.png", "height": 20, "width": 20}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(rect(5, 5, 30, 30))}]
    src = pics / "labels.json"
    categories = [{"id": 1, "name": "x"}]
    src.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    result = run_import("--format", "coco", src, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "1 images, 1 instances" in result.output
    assert "skipped image 2 (tiny.png): image is 20x20: both sides must be >= 32 px" in result.output
    assert validate_dataset(tmp_path / "out") == []

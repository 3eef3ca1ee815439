"""Dataset validation and loading: every fault is reported, with its file and ids."""

from __future__ import annotations

import io
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gara.data.coco import mask_bbox, mask_to_rle
from gara.data.dataset import InstanceDataset, collate_samples
from gara.data.validate import DatasetValidationError, ProblemKind, validate_dataset

H, W = 40, 60


def _image_bytes(fmt: str, height: int = H, width: int = W, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def _box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _rle_ann(ann_id: int, image_id: int, mask: np.ndarray) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "segmentation": mask_to_rle(mask), "bbox": mask_bbox(mask),
            "area": int(mask.sum())}


def _poly_ann(ann_id: int, image_id: int, poly: list[float]) -> dict[str, Any]:
    xs, ys = poly[0::2], poly[1::2]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "segmentation": [poly], "bbox": bbox}


def _write(root: Path, coco: dict[str, Any], files: dict[str, bytes]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")
    return root


def _entry(image_id: int, name: str, **extra: Any) -> dict[str, Any]:
    return {"id": image_id, "file_name": name, "height": H, "width": W, **extra}


def make_good(root: Path) -> Path:
    """Two images (JPEG + PNG), an RLE and a polygon instance, corruption metadata."""
    coco = {
        "images": [_entry(1, "images/a.jpg", corruption="gaussian_noise", severity=3),
                   _entry(2, "images/b.png")],
        "annotations": [
            _rle_ann(1, 1, _box_mask(5, 5, 20, 30)),
            _rle_ann(2, 1, _box_mask(30, 10, 55, 35)),
            _poly_ann(3, 2, [10.0, 5.0, 50.0, 5.0, 50.0, 35.0, 10.0, 35.0]),
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    files = {"images/a.jpg": _image_bytes("JPEG"), "images/b.png": _image_bytes("PNG", seed=1)}
    return _write(root, coco, files)


# Each fault: (kind, file, image id, annotation id) the validator must report.
EXPECTED_FAULTS = {
    "garbage bytes": (ProblemKind.UNREADABLE_IMAGE, "images/garbage.jpg", 3, None),
    "truncated jpeg": (ProblemKind.UNREADABLE_IMAGE, "images/trunc.jpg", 4, None),
    "truncated png": (ProblemKind.UNREADABLE_IMAGE, "images/trunc.png", 5, None),
    "missing file": (ProblemKind.MISSING_FILE, "images/nowhere.jpg", 6, None),
    "wrong size": (ProblemKind.SIZE_MISMATCH, "images/big.jpg", 7, None),
    "unknown image id": (ProblemKind.UNKNOWN_IMAGE, "annotations.json", 999, 10),
    "rle wrong size": (ProblemKind.MASK_SIZE, "annotations.json", 1, 11),
    "polygon outside": (ProblemKind.MASK_OUTSIDE, "annotations.json", 1, 12),
    "empty rle": (ProblemKind.EMPTY_MASK, "annotations.json", 8, 13),
    "zero-width box": (ProblemKind.BAD_BBOX, "annotations.json", 8, 14),
    "missing box": (ProblemKind.BAD_BBOX, "annotations.json", 8, 15),
    "box disagrees with mask": (ProblemKind.BAD_BBOX, "annotations.json", 8, 16),
    "duplicate image id": (ProblemKind.DUPLICATE_ID, "annotations.json", 9, None),
    "duplicate annotation id": (ProblemKind.DUPLICATE_ID, "annotations.json", 8, 17),
    "missing segmentation": (ProblemKind.MISSING_KEY, "annotations.json", 8, 18),
    "missing height": (ProblemKind.MISSING_KEY, "annotations.json", 20, None),
    "unknown category": (ProblemKind.UNKNOWN_CATEGORY, "annotations.json", 8, 19),
}


def make_broken(root: Path) -> Path:
    """The good dataset plus one instance of every fault validation must catch."""
    make_good(root)
    coco = json.loads((root / "annotations.json").read_text())
    jpeg, png = _image_bytes("JPEG", seed=2), _image_bytes("PNG", seed=3)
    files = {
        "images/garbage.jpg": b"this is not an image at all",
        "images/trunc.jpg": jpeg[: len(jpeg) // 2],
        "images/trunc.png": png[:-3],  # pixels intact, cut inside the IEND chunk
        "images/big.jpg": _image_bytes("JPEG", height=H + 10),
        "images/ok8.jpg": _image_bytes("JPEG", seed=8),
        "images/dup_a.jpg": _image_bytes("JPEG", seed=9),
        "images/dup_b.jpg": _image_bytes("JPEG", seed=10),
    }
    coco["images"] += [
        _entry(3, "images/garbage.jpg"), _entry(4, "images/trunc.jpg"),
        _entry(5, "images/trunc.png"), _entry(6, "images/nowhere.jpg"),
        _entry(7, "images/big.jpg"), _entry(8, "images/ok8.jpg"),
        _entry(9, "images/dup_a.jpg"), _entry(9, "images/dup_b.jpg"),
        {"id": 20, "file_name": "images/ok8.jpg", "width": W},  # no height
    ]
    mask = _box_mask(10, 10, 30, 30)
    small = mask_to_rle(np.ones((H // 2, W // 2), dtype=bool))
    coco["annotations"] += [
        _rle_ann(10, 999, mask),
        {**_rle_ann(11, 1, mask), "segmentation": small},
        _poly_ann(12, 1, [10.0, 10.0, 80.0, 10.0, 80.0, 30.0]),
        {**_rle_ann(13, 8, mask), "segmentation": mask_to_rle(np.zeros((H, W), bool))},
        {**_rle_ann(14, 8, mask), "bbox": [10.0, 10.0, 0.0, 20.0]},
        {k: v for k, v in _rle_ann(15, 8, mask).items() if k != "bbox"},
        {**_rle_ann(16, 8, mask), "bbox": [40.0, 0.0, 10.0, 10.0]},
        _rle_ann(17, 8, mask), _rle_ann(17, 8, _box_mask(0, 0, 5, 5)),
        {k: v for k, v in _rle_ann(18, 8, mask).items() if k != "segmentation"},
        {**_rle_ann(19, 8, mask), "category_id": 42},
    ]
    (root / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def _gara(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gara.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_good_dataset_has_no_problems(tmp_path: Path) -> None:
    assert validate_dataset(make_good(tmp_path)) == []


def test_broken_dataset_reports_every_fault(tmp_path: Path) -> None:
    problems = validate_dataset(make_broken(tmp_path))
    found = {(p.kind, p.file, p.image_id, p.ann_id) for p in problems}
    missing = {name: fault for name, fault in EXPECTED_FAULTS.items() if fault not in found}
    assert not missing, f"not reported: {missing}\nreported:\n" + "\n".join(map(str, problems))
    # The good images 1 and 2 and their annotations 1-3 raise nothing of their own.
    assert not [p for p in problems if p.ann_id in (1, 2, 3) or p.image_id == 2]
    assert all(p.message for p in problems)


@pytest.mark.parametrize(
    ("content", "kind"),
    [("{not json", ProblemKind.MALFORMED_JSON), ('{"images": []}', ProblemKind.MISSING_KEY),
     ("[1, 2]", ProblemKind.MALFORMED_JSON)],
)
def test_malformed_annotation_file(tmp_path: Path, content: str, kind: ProblemKind) -> None:
    (tmp_path / "annotations.json").write_text(content)
    problems = validate_dataset(tmp_path)
    assert [p.kind for p in problems] == [kind]
    assert problems[0].file == "annotations.json"


def test_missing_annotation_file(tmp_path: Path) -> None:
    problems = validate_dataset(tmp_path)
    assert [p.kind for p in problems] == [ProblemKind.MISSING_FILE]


def test_cli_exit_codes(tmp_path: Path) -> None:
    good = _gara("data", "validate", str(make_good(tmp_path / "good")))
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("OK:") and len(good.stdout.strip().splitlines()) == 1
    bad = _gara("data", "validate", str(make_broken(tmp_path / "bad")))
    assert bad.returncode == 1
    # The table names the files and ids of the faults.
    for line_part in ("images/trunc.jpg", "images/nowhere.jpg", "unknown-image", "999"):
        assert line_part in bad.stdout
    assert "problem(s)" in bad.stderr


def test_dataset_loads_good_samples(tmp_path: Path) -> None:
    ds = InstanceDataset(make_good(tmp_path))
    assert len(ds) == 2 and ds.num_skipped == 0
    first = ds[0]
    assert first["image"].shape == (H, W, 3) and first["image"].dtype == np.uint8
    assert first["masks"].shape == (2, H, W) and first["masks"].dtype == bool
    np.testing.assert_array_equal(first["boxes"][0], [5, 5, 20, 30])
    assert first["masks"][0].sum() == 15 * 25
    assert first["meta"] == {"corruption": "gaussian_noise", "severity": 3}
    assert first["image_id"] == 1 and list(first["ann_ids"]) == [1, 2]
    poly = ds[1]
    assert poly["masks"].shape == (1, H, W) and poly["masks"].any()
    np.testing.assert_array_equal(poly["boxes"][0], [10, 5, 50, 35])
    assert poly["meta"] == {}
    with pytest.raises(IndexError):
        ds[2]
    # Picklable (DataLoader workers) and loads the same after the round trip.
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[0]["masks"], first["masks"])
    assert collate_samples([first, poly])[1] is poly


def test_dataset_fail_raises_with_report(tmp_path: Path) -> None:
    with pytest.raises(DatasetValidationError) as err:
        InstanceDataset(make_broken(tmp_path), on_error="fail")
    kinds = {p.kind for p in err.value.problems}
    assert {ProblemKind.UNREADABLE_IMAGE, ProblemKind.MASK_SIZE} <= kinds
    assert "images/trunc.jpg" in str(err.value)


def test_dataset_skip_logs_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gara.data.dataset"):
        ds = InstanceDataset(make_broken(tmp_path), on_error="skip")
    # Images 1 and 8 carry bad annotations; 3-7 and 9 (twice) and 20 are bad themselves.
    assert sorted(ds.image_ids) == [2]
    assert ds.num_skipped == 10  # image id 9 has two entries
    skipped_ids = {s.image_id for s in ds.skipped if s.ann_id is None}
    assert skipped_ids == {1, 3, 4, 5, 6, 7, 8, 9, 20}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("images/trunc.jpg" in m and "image id 4" in m for m in messages)
    assert any("annotation 10" in m and "999" in m for m in messages)  # orphan annotation
    assert len(messages) == len(ds.skipped)
    assert ds[0]["image_id"] == 2


def test_dataset_skip_still_raises_on_unusable_file(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text("{broken")
    with pytest.raises(DatasetValidationError, match="not valid JSON"):
        InstanceDataset(tmp_path, on_error="skip")


def test_torch_dataloader(tmp_path: Path) -> None:
    torch_data = pytest.importorskip("torch.utils.data")
    ds = InstanceDataset(make_good(tmp_path))
    loader = torch_data.DataLoader(ds, batch_size=2, collate_fn=collate_samples)
    (batch,) = list(loader)
    assert [s["image_id"] for s in batch] == [1, 2]

"""The embedded sample builder: deterministic, valid, big enough, no val leakage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from gara.data.dataset import InstanceDataset
from gara.data.sample import (
    DEFAULT_TRAIN_SIZE,
    DEFAULT_VAL_SIZE,
    SPLITS,
    UNLABELLED_CROPS,
    UNLABELLED_PHOTOS,
    build_sample,
    check_disjoint,
    source_instances,
)
from gara.data.validate import validate_dataset

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _coco(folder: Path) -> dict:
    return json.loads((folder / "annotations.json").read_text())


@pytest.fixture(scope="module")
def full_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    build_sample(out, seed=0)
    return out


def test_builder_is_deterministic(tmp_path: Path) -> None:
    def build(folder: str, seed: int) -> dict[str, bytes]:
        build_sample(tmp_path / folder, seed=seed, train_size=8, val_size=4, unlabelled_crops=2)
        return _files(tmp_path / folder)

    first, second, other = build("a", 3), build("b", 3), build("c", 4)
    assert first.keys() == second.keys() and len(first) == 8 + 4 + 2 + 2 * len(UNLABELLED_PHOTOS)
    assert first == second, [k for k in first if first[k] != second[k]]
    assert first != other  # the seed matters
    assert first["unlabelled/images/coffee_1.jpg"] != other["unlabelled/images/coffee_1.jpg"]  # crops too
    # No temp or half-built folders are left behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train", "unlabelled", "val"]


def test_rebuild_replaces_previous_output(tmp_path: Path) -> None:
    build_sample(tmp_path, seed=1, train_size=6, val_size=3)
    (tmp_path / "train" / "stale.txt").write_text("left over")
    build_sample(tmp_path, seed=1, train_size=5, val_size=2)
    assert not (tmp_path / "train" / "stale.txt").exists()
    assert len(_coco(tmp_path / "train")["images"]) == 5


def test_full_sample_is_valid_and_large(full_sample: Path) -> None:
    for split, size in (("train", DEFAULT_TRAIN_SIZE), ("val", DEFAULT_VAL_SIZE)):
        folder = full_sample / split
        assert validate_dataset(folder) == [], split
        coco = _coco(folder)
        assert len(coco["images"]) == size
        assert len(coco["annotations"]) >= 2 * size  # several instances per image
        sizes = {max(e["height"], e["width"]) for e in coco["images"]}
        assert min(sizes) >= 256 and max(sizes) <= 320
        assert len({e["file_name"] for e in coco["images"]}) == size
    assert DEFAULT_TRAIN_SIZE >= 200
    # Small enough to commit in the in-repo DVC store.
    total = sum(p.stat().st_size for p in full_sample.rglob("*") if p.is_file())
    assert total < 15 * 2**20, total
    # Loadable as training samples, with the real photos first.
    sample = InstanceDataset(full_sample / "train")[0]
    assert sample["meta"]["source"] == "photo" and len(sample["masks"]) >= 10
    # The unlabelled photos: a plain folder (no annotations.json), valid, many views per photo.
    unlabelled = full_sample / "unlabelled"
    assert validate_dataset(unlabelled, unlabelled=True) == []
    assert not (unlabelled / "annotations.json").exists()
    views = sorted(p.name for p in (unlabelled / "images").iterdir())
    assert len(views) == UNLABELLED_CROPS * len(UNLABELLED_PHOTOS) >= 8 * 10
    assert {v.rsplit("_", 1)[0] for v in views} == set(UNLABELLED_PHOTOS)


def test_no_val_instance_or_background_in_train(full_sample: Path) -> None:
    train, val = _coco(full_sample / "train"), _coco(full_sample / "val")
    train_keys, val_keys = source_instances(train), source_instances(val)
    assert train_keys and val_keys
    assert not train_keys & val_keys
    # Every annotation carries its source, and val draws only on the held-out photos.
    assert all("source_instance" in a for a in train["annotations"] + val["annotations"])
    val_photos = set(SPLITS["val"]["photos"])
    assert {k.split(":")[0] for k in val_keys} <= val_photos
    assert not {k.split(":")[0] for k in train_keys} & val_photos
    train_bgs = {e.get("background") for e in train["images"]} - {None}
    val_bgs = {e.get("background") for e in val["images"]} - {None}
    assert train_bgs and val_bgs and not train_bgs & val_bgs
    check_disjoint(train, val)


def test_leak_check_catches_a_leak(full_sample: Path) -> None:
    train, val = _coco(full_sample / "train"), _coco(full_sample / "val")
    leaky = copy.deepcopy(train)
    leaky["annotations"][-1]["source_instance"] = val["annotations"][0]["source_instance"]
    with pytest.raises(AssertionError, match="leak"):
        check_disjoint(leaky, val)


def test_committed_sample_matches_builder(full_sample: Path) -> None:
    """data/ (pulled with DVC) is the builder's default output, and valid."""
    data = REPO / "data"
    if not (data / "train" / "annotations.json").is_file():
        pytest.skip("data/ is not present here; run `dvc pull` to fetch the embedded sample")
    assert _files(data / "unlabelled") == _files(full_sample / "unlabelled")
    for split in SPLITS:
        committed, built = _coco(data / split), _coco(full_sample / split)
        assert validate_dataset(data / split) == [], split
        assert [e["file_name"] for e in committed["images"]] == [
            e["file_name"] for e in built["images"]]
        assert source_instances(committed) == source_instances(built)

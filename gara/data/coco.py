"""The dataset format: a folder holding ``annotations.json`` (COCO instance segmentation,
polygons or RLE) and the images it names, relative to the folder. A folder of images with no
``annotations.json`` is an unlabelled dataset (:mod:`gara.data.unlabelled`), read as the same
images with zero annotations where a command asks for it (validation, ``gara corrupt``'s input).

This module is the one place that reads and writes that format; validation, loading,
corruption and evaluation all go through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from gara.data.storage import DatasetStore
from gara.data.unlabelled import folder_coco, folder_images
from gara.fsutil import atomic_write_json

ANNOTATIONS_FILE = "annotations.json"
# Where `gara corrupt` keeps per-image records while it writes a dataset; annotations.json comes
# last, so a folder holding this one and no annotations.json is an unfinished output.
RECORDS_DIR = ".records"
# Annotation tools save polygon vertices a fraction of a pixel past the border all the time; up
# to this far they are clipped to the image (and counted, with a warning, by validation), further
# is an error in the annotation.
MAX_OVERSHOOT_PX = 1.0


class DatasetFormatError(ValueError):
    """The dataset folder or its annotation file is not in the expected format."""


def annotations_path(root: str | Path) -> Path:
    return Path(root) / ANNOTATIONS_FILE


def read_coco(root: str | Path, *, unlabelled: bool = False) -> dict[str, Any]:
    """Read ``ROOT/annotations.json`` and check its top-level shape (not the masks). With
    ``unlabelled``, a folder without one that holds images is read as an unlabelled dataset;
    elsewhere a missing annotations.json stays an error (a labelled split that was not pulled
    must never pass as a set with no labels)."""
    path = annotations_path(root)
    if path.is_file():
        return parse_coco(path.read_bytes(), str(path))
    if unlabelled and is_image_folder(root):
        return folder_coco(root)
    raise DatasetFormatError(f"{path}: missing; {missing_annotations_hint(root, unlabelled)}")


def missing_annotations_hint(root: str | Path, unlabelled: bool) -> str:
    """What a folder without annotations.json needs, in words."""
    hint = f"a dataset folder needs {ANNOTATIONS_FILE}" + (
        " (labelled) or image files (unlabelled)" if unlabelled else "")
    if (Path(root) / RECORDS_DIR).is_dir():
        hint += f"; {RECORDS_DIR}/ there marks an unfinished `gara corrupt` output: run it again"
    return hint


def is_image_folder(root: str | Path) -> bool:
    """A folder with image files and neither annotations.json nor an unfinished `gara corrupt`
    output's records: an unlabelled dataset."""
    root = Path(root)
    return (root.is_dir() and not annotations_path(root).exists() and not (root / RECORDS_DIR).exists()
            and bool(folder_images(root)))


def parse_coco(raw: bytes, where: str) -> dict[str, Any]:
    """The annotation file's bytes -> its dict, top-level shape checked; ``where`` names it."""
    try:
        coco = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(coco, dict):
        raise DatasetFormatError(f"{where}: top level must be an object, got {type(coco).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(coco.get(key), list):
            raise DatasetFormatError(f"{where}: key '{key}' must be a list")
    coco.setdefault("categories", [])
    return coco


def refuse_foreign_output(out: DatasetStore, owner_key: str, command: str, *, resumable: bool = False
                          ) -> None:
    """Refuse to write a dataset into ``out`` unless it is new, empty, or a dataset ``command``
    wrote: its annotations.json carries the top-level ``owner_key`` (or, for a ``resumable``
    command, ``out`` holds the records of its interrupted run). Another team's dataset, or a
    folder (prefix) holding other files, is never written into."""
    raw = out.read_optional(ANNOTATIONS_FILE)
    if raw is not None:
        try:
            coco = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            coco = None
        if not (isinstance(coco, dict) and owner_key in coco):
            raise DatasetFormatError(
                f"{out.describe(ANNOTATIONS_FILE)}: --out holds a dataset that {command} did not write; "
                "choose a new or empty folder (nothing was changed)")
        return
    if resumable and out.first_name(RECORDS_DIR) is not None:
        return
    stray = out.first_name()
    if stray is not None:
        raise DatasetFormatError(
            f"{out.describe()}: --out is not empty (it holds {stray}, and no dataset {command} wrote); "
            "choose a new or empty folder (nothing was changed)")


def write_coco(root: str | Path, coco: dict[str, Any]) -> Path:
    """Write ``ROOT/annotations.json`` atomically."""
    return atomic_write_json(annotations_path(root), coco)


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Decode one annotation's ``segmentation`` (polygons, RLE or compressed RLE) to a bool mask;
    polygon vertices are clipped to the image first (see ``MAX_OVERSHOOT_PX``)."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects([clip_polygon(poly, height, width) for poly in seg], height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
        if isinstance(rle.get("counts"), str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    else:
        raise DatasetFormatError(
            f"annotation {ann.get('id')}: 'segmentation' must be polygons or RLE, got {type(seg).__name__}"
        )
    return mask_utils.decode(rle).astype(bool)


def polygon_overshoot(poly: list[float], height: int, width: int) -> float:
    """How far (px) a flat x,y polygon reaches past the ``width`` x ``height`` image; 0 inside."""
    xs, ys = poly[0::2], poly[1::2]
    return max(-min(xs), -min(ys), max(xs) - width, max(ys) - height, 0.0)


def clip_polygon(poly: list[float], height: int, width: int) -> list[float]:
    """A flat x,y polygon with every vertex moved inside the ``width`` x ``height`` image."""
    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    return np.clip(xy, 0, [width, height]).ravel().tolist()


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a bool mask (H, W) as JSON-serialisable compressed RLE."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_bbox(mask: np.ndarray) -> list[float]:
    """Tight COCO box ``[x, y, w, h]`` of a bool mask (zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]

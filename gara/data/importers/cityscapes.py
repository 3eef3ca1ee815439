"""Cityscapes-style instance-id PNGs (Cityscapes ``gtFine``, ACDC ``gt``; any ``*instanceIds.png``).

A pixel value v >= 1000 belongs to instance v of class v // 1000 (Cityscapes label ids); values
below 1000 are stuff or crowds without instances and are left out. Category ids are the label
ids. The PNG is read as an integer array (it may be 16-bit), never through RGB.

Images live under ``--images`` (Cityscapes ``leftImg8bit/``, ACDC ``rgb_anon/``) in the same
sub-folder as the PNG under SRC, named by the frame key (the file name before ``_gtFine`` /
``_gt``) plus ``_leftImg8bit`` / ``_rgb_anon`` or nothing, and an image suffix. Without
``--images`` the parallel tree (SRC with ``gtFine`` -> ``leftImg8bit``, ``gt`` -> ``rgb_anon``)
and SRC itself are tried.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gara.data.coco import mask_to_rle
from gara.data.images import displayed_size
from gara.data.importers.writer import Skip, SourceData, SourceImage, SourceInstance, listed
from gara.data.unlabelled import IMAGE_SUFFIXES

LABELS = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 29: "caravan", 30: "trailer",
          31: "train", 32: "motorcycle", 33: "bicycle"}
IMAGE_TAGS = ("_leftImg8bit", "_rgb_anon", "")
IMAGE_TREES = {"gtFine": "leftImg8bit", "gt": "rgb_anon"}
_KEY = re.compile(r"(_gtFine|_gt)?_?instanceIds\.png$")


def frame_key(name: str) -> str:
    """``aachen_000000_000019_gtFine_instanceIds.png`` -> ``aachen_000000_000019``."""
    return _KEY.sub("", name)


def image_roots(src: Path, images: Path | None) -> list[Path]:
    if images is not None:
        return [images]
    parts = src.parts
    trees = [Path(*parts[:i], IMAGE_TREES[p], *parts[i + 1:])
             for i, p in enumerate(parts) if p in IMAGE_TREES]
    return [root for root in trees if root.is_dir()] + [src]


def read_instance_ids(path: Path) -> np.ndarray:
    """The PNG as an integer (H, W) array; a colour PNG is not an instance-id map."""
    displayed_size(path)  # the pixel limit, before decoding
    with Image.open(path) as img:
        if img.mode not in ("I", "I;16", "I;16B", "I;16L", "L", "P"):
            raise ValueError(f"{path}: mode {img.mode}, not a single-channel instance-id PNG")
        return np.asarray(img).astype(np.int64)


def read(src: Path, images: Path | None, skip: Skip) -> SourceData:
    files = listed(src, "*instanceIds.png", "cityscapes", "instance-id PNGs")
    roots = image_roots(src, images)
    categories: dict[int, dict[str, Any]] = {}

    def generate():
        for path in files:
            rel = path.relative_to(src)
            key = (rel.parent / frame_key(path.name)).as_posix()
            try:
                ids = read_instance_ids(path)
            except (OSError, ValueError) as exc:
                skip(rel.as_posix(), str(exc))
                continue
            instances = []
            for value in np.unique(ids[ids >= 1000]):
                label = int(value) // 1000
                categories.setdefault(label, {"id": label, "name": LABELS.get(label, f"class_{label}")})
                instances.append(SourceInstance(label, mask_to_rle(ids == value), int(value)))
            names = [f"{key}{tag}{suffix}" for tag in IMAGE_TAGS for suffix in IMAGE_SUFFIXES]
            yield SourceImage(f"{rel.as_posix()} (frame {key})", instances,
                              [(root, name) for root in roots for name in names], size=ids.shape[:2])

    return SourceData(generate(), categories, len(files))

"""COCO and LVIS instance JSON files: one reader, since LVIS v1 is COCO whose image entries
name their file only by ``coco_url`` (LVIS v1 val draws on both COCO train2017 and val2017, so
the split folder is kept in the output name).

SRC is the JSON file. Images are looked up under ``--images``; without it, under the JSON's
folder and, when that folder is ``annotations/``, under its parent and the sibling folder named
after the split in the file name (``instances_val2017.json`` -> ``../val2017``). COCO's image,
annotation and category ids are kept when they are unique integers.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from gara.data.coco import DatasetFormatError, parse_coco
from gara.data.importers.writer import Skip, SourceData, SourceImage, SourceInstance, need
from gara.data.validate import is_int

_SPLIT = re.compile(r"_([A-Za-z]+\d*)$")  # instances_val2017 -> val2017
# Annotation keys the writer sets itself; every other key is kept.
_ANN_KEYS = ("id", "image_id", "category_id", "segmentation", "bbox", "area", "iscrowd")
_IMAGE_KEYS = ("id", "file_name", "height", "width")


def read_coco(src: Path, images: Path | None, skip: Skip) -> SourceData:
    return _read(src, images, skip, lvis=False)


def read_lvis(src: Path, images: Path | None, skip: Skip) -> SourceData:
    return _read(src, images, skip, lvis=True)


def image_roots(src: Path, images: Path | None) -> list[Path]:
    """Where image files are looked for, in order (see the module docstring)."""
    if images is not None:
        return [images]
    roots = [src.parent]
    if src.parent.name == "annotations":
        split = _SPLIT.search(src.stem)
        if split:
            roots.append(src.parent.parent / split.group(1))
        roots.append(src.parent.parent)
    return [root for root in roots if root.is_dir()]


def _unique_ints(ids: list[Any]) -> bool:
    return all(map(is_int, ids)) and len(set(ids)) == len(ids)


def _read(src: Path, images: Path | None, skip: Skip, lvis: bool) -> SourceData:
    fmt = "lvis" if lvis else "coco"
    if not src.is_file():
        raise IsADirectoryError(f"{src}: --format {fmt} takes the annotation JSON file itself")
    coco = parse_coco(src.read_bytes(), str(src))
    categories: dict[int, dict[str, Any]] = {}
    for index, cat in enumerate(coco["categories"]):
        need(cat, ("id", "name"), f"{src}: categories[{index}]")
        if not is_int(cat["id"]) or cat["id"] in categories:
            raise DatasetFormatError(f"{src}: categories[{index}]: 'id' {cat['id']!r:.40} is not a unique "
                                     "integer")
        categories[cat["id"]] = cat
    entries = coco["images"]
    for index, entry in enumerate(entries):
        where = f"{src}: images[{index}]"
        need(entry, ("id",), where)
        if not isinstance(entry["id"], int | str):
            raise DatasetFormatError(f"{where}: 'id' must be an integer, got {entry['id']!r:.40}")
        if "file_name" not in entry and not (lvis and "coco_url" in entry):
            hint = " (an LVIS v1 file? use --format lvis)" if "coco_url" in entry else ""
            raise DatasetFormatError(f"{where}: key {'coco_url' if lvis else 'file_name'!r} is missing{hint}")
    counts = Counter(e["id"] for e in entries)
    by_image: dict[Any, list[SourceInstance]] = defaultdict(list)
    keep_ann_ids = _unique_ints([a.get("id") for a in coco["annotations"] if isinstance(a, dict)])
    for index, ann in enumerate(coco["annotations"]):
        need(ann, ("image_id", "category_id", "segmentation"), f"{src}: annotations[{index}]")
        key = ann.get("id", f"annotations[{index}]")
        if not isinstance(ann["image_id"], int | str) or counts.get(ann["image_id"]) != 1:
            skip(f"annotation {key}", f"image_id {ann['image_id']!r:.40} names no single image entry")
            continue
        by_image[ann["image_id"]].append(SourceInstance(
            ann["category_id"], ann["segmentation"], key, id=ann.get("id") if keep_ann_ids else None,
            iscrowd=ann.get("iscrowd", 0), extra={k: v for k, v in ann.items() if k not in _ANN_KEYS}))
    keep_image_ids = _unique_ints([e["id"] for e in entries])
    roots = image_roots(src, images)

    def generate():
        for entry in entries:
            files, out_name = _files(entry, roots)
            if counts[entry["id"]] > 1:
                skip(f"image {entry['id']} ({out_name})",
                     f"image id {entry['id']!r} is used by {counts[entry['id']]} entries")
                continue
            size = (entry.get("height"), entry.get("width"))
            stated = all(is_int(v) and v > 0 for v in size)
            yield SourceImage(
                f"image {entry['id']} ({out_name})", by_image.pop(entry["id"], []), files, out_name,
                size=size if stated else None,
                id=entry["id"] if keep_image_ids else None,
                extra={k: v for k, v in entry.items() if k not in _IMAGE_KEYS})

    return SourceData(generate(), categories, len(entries))


def _files(entry: dict[str, Any], roots: list[Path]) -> tuple[list[tuple[Path, str]], str]:
    """Candidate (root, name) pairs for an image entry, and its name in the output."""
    name = entry.get("file_name")
    if isinstance(name, str) and name:
        return [(root, name) for root in roots], name
    url = PurePosixPath(urlparse(str(entry["coco_url"])).path)  # LVIS v1: .../val2017/0000.jpg
    split_name = f"{url.parent.name}/{url.name}" if url.parent.name else url.name
    return [(root, n) for root in roots for n in dict.fromkeys((split_name, url.name))], split_name

"""Dataset validation: find every problem in a dataset folder, not just the first.

A dataset folder holds ``annotations.json`` (COCO instance segmentation) and the images it
names (see :mod:`gara.data.coco`), or only images (an unlabelled dataset,
:mod:`gara.data.unlabelled`). :func:`validate_dataset` decodes every image and every
mask, so a truncated JPEG or an RLE of the wrong size is caught here, before training or
evaluation trips over it hours later.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gara.data.coco import (
    ANNOTATIONS_FILE,
    annotation_mask,
    annotations_path,
    is_image_folder,
    mask_bbox,
    missing_annotations_hint,
    read_coco,
)
from gara.data.unlabelled import UNREADABLE_KEY, folder_coco

# How far a stored bbox may differ from the mask's tight box: polygon extents are floats and
# rasterisation rounds them, so allow a couple of pixels (or 5 % of the box on large boxes).
BBOX_TOLERANCE_PX = 2.0
BBOX_TOLERANCE_FRAC = 0.05

_PNG_IEND = b"IEND"

# An image smaller than this on either side holds nothing a prompt box or a 1024 px model can
# use (a thumbnail, an icon, a stray file).
MIN_IMAGE_SIDE = 32


class ProblemKind(StrEnum):
    MALFORMED_JSON = "malformed-json"
    MISSING_KEY = "missing-key"
    BAD_VALUE = "bad-value"
    DUPLICATE_ID = "duplicate-id"
    MISSING_FILE = "missing-file"
    UNREADABLE_IMAGE = "unreadable-image"
    SIZE_MISMATCH = "size-mismatch"
    TOO_SMALL = "too-small"
    UNKNOWN_IMAGE = "unknown-image"
    UNKNOWN_CATEGORY = "unknown-category"
    BAD_SEGMENTATION = "bad-segmentation"
    MASK_SIZE = "mask-size"
    MASK_OUTSIDE = "mask-outside"
    EMPTY_MASK = "empty-mask"
    BAD_BBOX = "bad-bbox"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (file, ids), what (kind) and why (message)."""

    kind: ProblemKind
    file: str
    message: str
    image_id: Any = None
    ann_id: Any = None

    def __str__(self) -> str:
        where = [self.file]
        if self.image_id is not None:
            where.append(f"image {self.image_id}")
        if self.ann_id is not None:
            where.append(f"annotation {self.ann_id}")
        return f"{', '.join(where)}: [{self.kind}] {self.message}"


# Reports one problem of the annotation being checked: (kind, message).
Report = Callable[[ProblemKind, str], None]


class DatasetValidationError(ValueError):
    """A dataset has problems; ``problems`` holds all of them."""

    def __init__(self, root: str | Path, problems: list[Problem]) -> None:
        self.root = Path(root)
        self.problems = problems
        lines = [f"{self.root}: {len(problems)} dataset problem(s):"]
        lines += [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file completely to RGB uint8 (H, W, 3); raise ``OSError`` if it is
    unreadable or truncated.

    PIL's ``load()`` catches truncated JPEG and PNG pixel data; a PNG cut inside its final
    IEND chunk still decodes, so that trailer is checked explicitly.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.format == "PNG" and not _png_has_iend(path):
                raise OSError("truncated PNG file (no complete IEND chunk)")
            rgb = img.convert("RGB")
    except OSError:
        raise  # already the documented error type (truncated, unidentified image...)
    except Exception as exc:  # PIL raises SyntaxError/ValueError for some corrupt headers
        raise OSError(f"cannot decode image: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def _png_has_iend(path: Path) -> bool:
    """Whether the PNG's final IEND chunk (type + CRC) is complete."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 4096))
        tail = fh.read()
    end = tail.rfind(_PNG_IEND)
    return end >= 0 and len(tail) >= end + len(_PNG_IEND) + 4


def _image_problem(root: Path, entry: dict[str, Any]) -> list[Problem]:
    """Decode one image entry's file; report a missing/unreadable file or a size mismatch."""
    rel, image_id = entry["file_name"], entry["id"]
    path = root / rel
    if not path.is_file():
        return [Problem(ProblemKind.MISSING_FILE, rel, f"image file {path} does not exist",
                        image_id=image_id)]
    try:
        rgb = read_image(path)
    except OSError as exc:
        return [Problem(ProblemKind.UNREADABLE_IMAGE, rel, f"cannot decode {path}: {exc}",
                        image_id=image_id)]
    height, width = rgb.shape[:2]
    if (height, width) != (entry["height"], entry["width"]):
        return [Problem(
            ProblemKind.SIZE_MISMATCH, rel,
            f"image is {width}x{height} (WxH) but the entry says "
            f"width={entry['width']} height={entry['height']}",
            image_id=image_id,
        )]
    if min(height, width) < MIN_IMAGE_SIDE:
        return [Problem(ProblemKind.TOO_SMALL, rel,
                        f"image is {width}x{height}: both sides must be >= {MIN_IMAGE_SIDE} px",
                        image_id=image_id)]
    return []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def hashable_id(value: Any) -> Any:
    """Ids are reported as given; unhashable junk (a list as id) is shown via its repr."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _duplicates(ids: Iterable[Any]) -> set[Any]:
    return {key for key, count in Counter(ids).items() if count > 1}


class _Validator:
    """Collects problems while walking one dataset's annotation file."""

    def __init__(self, root: Path, workers: int, unlabelled: bool) -> None:
        self.root = root
        self.workers = workers
        self.unlabelled = unlabelled  # may the folder be a plain folder of images?
        self.plain_folder = unlabelled and is_image_folder(root)
        self.problems: list[Problem] = []
        self.images: dict[Any, dict[str, Any]] = {}  # id -> entry (well-formed entries only)
        self.category_ids: set[Any] = set()

    def add(self, kind: ProblemKind, message: str, *, file: str = ANNOTATIONS_FILE,
            image_id: Any = None, ann_id: Any = None) -> None:
        problem = Problem(kind, file, message, hashable_id(image_id), hashable_id(ann_id))
        self.problems.append(problem)

    # -- top level -------------------------------------------------------------------------
    def run(self) -> list[Problem]:
        coco = self.load_json()
        if coco is None:
            return self.problems
        images = self.top_list(coco, "images", required=True)
        annotations = self.top_list(coco, "annotations", required=True)
        categories = self.top_list(coco, "categories", required=False)
        self.check_categories(categories)
        self.check_images(images)
        self.check_annotations(annotations)
        return self.problems

    def load_json(self) -> dict[str, Any] | None:
        path = annotations_path(self.root)
        if self.plain_folder:
            return folder_coco(self.root)
        if not path.is_file():
            self.add(ProblemKind.MISSING_FILE,
                     f"{path} does not exist; {missing_annotations_hint(self.root, self.unlabelled)}")
            return None
        try:
            coco = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.add(ProblemKind.MALFORMED_JSON, f"{path} is not valid JSON: {exc}")
            return None
        if not isinstance(coco, dict):
            self.add(ProblemKind.MALFORMED_JSON,
                     f"top level must be an object, got {type(coco).__name__}")
            return None
        return coco

    def top_list(self, coco: dict[str, Any], key: str, *, required: bool) -> list[Any]:
        if key not in coco:
            if required:
                self.add(ProblemKind.MISSING_KEY, f"top-level key '{key}' is missing")
            return []
        if not isinstance(coco[key], list):
            self.add(ProblemKind.BAD_VALUE,
                     f"top-level key '{key}' must be a list, got {type(coco[key]).__name__}")
            return []
        return coco[key]

    def missing_keys(self, what: str, entry: Any, keys: tuple[str, ...], *,
                     image_id: Any = None, ann_id: Any = None) -> bool:
        """Report absent keys; True when the entry cannot be checked further."""
        if not isinstance(entry, dict):
            self.add(ProblemKind.BAD_VALUE, f"{what} must be an object, got {entry!r:.60}")
            return True
        absent = [key for key in keys if key not in entry]
        if absent:
            self.add(ProblemKind.MISSING_KEY, f"{what} lacks key(s) {', '.join(absent)}",
                     image_id=image_id, ann_id=ann_id)
        return bool(absent)

    # -- categories ------------------------------------------------------------------------
    def check_categories(self, categories: list[Any]) -> None:
        ids = []
        for index, cat in enumerate(categories):
            if self.missing_keys(f"categories[{index}]", cat, ("id", "name")):
                continue
            if not _is_int(cat["id"]):
                self.add(ProblemKind.BAD_VALUE,
                         f"categories[{index}]: id must be an integer, got {cat['id']!r}")
                continue
            ids.append(cat["id"])
        for dup in sorted(_duplicates(ids)):
            self.add(ProblemKind.DUPLICATE_ID, f"category id {dup} is used more than once")
        self.category_ids = set(ids)

    # -- images ----------------------------------------------------------------------------
    def check_images(self, images: list[Any]) -> None:
        good: list[dict[str, Any]] = []
        for index, entry in enumerate(images):
            image_id = entry.get("id") if isinstance(entry, dict) else None
            what = f"images[{index}]"
            if self.missing_keys(what, entry, ("id", "file_name", "height", "width"),
                                 image_id=image_id):
                continue
            if self.plain_folder and UNREADABLE_KEY in entry:  # its header did not parse
                self.add(ProblemKind.UNREADABLE_IMAGE,
                         f"cannot decode {self.root / entry['file_name']}: {entry[UNREADABLE_KEY]}",
                         file=entry["file_name"], image_id=image_id)
                continue
            if not _is_int(image_id):
                self.add(ProblemKind.BAD_VALUE, f"{what}: id must be an integer, got {image_id!r}",
                         image_id=image_id)
                continue
            if not self.image_entry_ok(what, entry):
                continue
            good.append(entry)
        dups = _duplicates(entry["id"] for entry in good)
        for dup in sorted(dups):
            files = [e["file_name"] for e in good if e["id"] == dup]
            self.add(ProblemKind.DUPLICATE_ID,
                     f"image id {dup} is used by {len(files)} entries: {', '.join(files)}",
                     image_id=dup)
        for entry in good:
            self.images.setdefault(entry["id"], entry)
        # Decoding dominates the cost; PIL releases the GIL while decoding.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for found in pool.map(lambda e: _image_problem(self.root, e), good):
                self.problems.extend(found)

    def image_entry_ok(self, what: str, entry: dict[str, Any]) -> bool:
        image_id, ok = entry["id"], True
        for key in ("height", "width"):
            if not _is_int(entry[key]) or entry[key] <= 0:
                self.add(ProblemKind.BAD_VALUE,
                         f"{what}: {key} must be a positive integer, got {entry[key]!r}",
                         image_id=image_id)
                ok = False
        rel = entry["file_name"]
        if not isinstance(rel, str) or not rel:
            self.add(ProblemKind.BAD_VALUE,
                     f"{what}: file_name must be a non-empty string, got {rel!r}",
                     image_id=image_id)
            return False
        resolved = os.path.normpath(rel)
        if os.path.isabs(rel) or resolved == ".." or resolved.startswith(".." + os.sep):
            self.add(ProblemKind.BAD_VALUE,
                     f"{what}: file_name {rel!r} must be a path inside the dataset folder",
                     file=rel, image_id=image_id)
            return False
        return ok

    # -- annotations -----------------------------------------------------------------------
    def check_annotations(self, annotations: list[Any]) -> None:
        ids = []
        for index, ann in enumerate(annotations):
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            what = f"annotations[{index}]"
            if self.missing_keys(what, ann, ("id", "image_id", "category_id", "segmentation"),
                                 image_id=image_id, ann_id=ann_id):
                # A missing bbox is still worth reporting alongside the other keys.
                if isinstance(ann, dict) and "bbox" not in ann:
                    self.add(ProblemKind.BAD_BBOX, f"{what}: bbox is missing",
                             image_id=image_id, ann_id=ann_id)
                continue
            if not _is_int(ann_id):
                self.add(ProblemKind.BAD_VALUE, f"{what}: id must be an integer, got {ann_id!r}",
                         image_id=image_id, ann_id=ann_id)
            else:
                ids.append(ann_id)
            self.check_annotation(what, ann)
        for dup in sorted(_duplicates(ids)):
            owners = sorted({a.get("image_id") for a in annotations
                             if isinstance(a, dict) and a.get("id") == dup}, key=str)
            for owner in owners:
                self.add(ProblemKind.DUPLICATE_ID, f"annotation id {dup} is used more than once",
                         image_id=owner, ann_id=dup)

    def check_annotation(self, what: str, ann: dict[str, Any]) -> None:
        ann_id, image_id = ann["id"], ann["image_id"]

        def report(kind: ProblemKind, message: str) -> None:
            self.add(kind, f"{what}: {message}", image_id=image_id, ann_id=ann_id)

        entry = self.images.get(hashable_id(image_id))
        if entry is None:
            report(ProblemKind.UNKNOWN_IMAGE, f"image_id {image_id!r} names no image entry")
        if self.category_ids and hashable_id(ann["category_id"]) not in self.category_ids:
            report(ProblemKind.UNKNOWN_CATEGORY,
                   f"category_id {ann['category_id']!r} names no category")
        size = (entry["height"], entry["width"]) if entry is not None else None
        mask = self.check_segmentation(ann["segmentation"], size, report)
        self.check_bbox(ann.get("bbox", None), "bbox" in ann, size, mask, report)

    def check_segmentation(self, seg: Any, size: tuple[int, int] | None,
                           report: Report) -> np.ndarray | None:
        """Check the segmentation's structure and bounds; return its mask when decodable."""
        if isinstance(seg, list):
            return self.check_polygons(seg, size, report)
        if isinstance(seg, dict):
            return self.check_rle(seg, size, report)
        report(ProblemKind.BAD_SEGMENTATION,
               f"segmentation must be a list of polygons or an RLE object, "
               f"got {type(seg).__name__}")
        return None

    def check_polygons(self, seg: list[Any], size: tuple[int, int] | None,
                       report: Report) -> np.ndarray | None:
        if not seg:
            report(ProblemKind.EMPTY_MASK, "segmentation is an empty polygon list")
            return None
        for k, poly in enumerate(seg):
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(_is_number(v) for v in poly)):
                report(ProblemKind.BAD_SEGMENTATION,
                       f"polygon {k} must be a flat list of >= 3 finite x,y pairs, "
                       f"got {poly!r:.80}")
                return None
        if size is None:
            return None
        height, width = size
        for k, poly in enumerate(seg):
            xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
            if xs.min() < 0 or ys.min() < 0 or xs.max() > width or ys.max() > height:
                report(ProblemKind.MASK_OUTSIDE,
                       f"polygon {k} spans x {xs.min():g}..{xs.max():g}, "
                       f"y {ys.min():g}..{ys.max():g}: outside the {width}x{height} image")
                return None
        mask = annotation_mask({"segmentation": seg}, height, width)
        if not mask.any():
            report(ProblemKind.EMPTY_MASK, "polygons cover no pixel")
        return mask

    def check_rle(self, seg: dict[str, Any], size: tuple[int, int] | None,
                  report: Report) -> np.ndarray | None:
        rle_size, counts = seg.get("size"), seg.get("counts")
        if (not isinstance(rle_size, list) or len(rle_size) != 2
                or not all(_is_int(v) and v >= 0 for v in rle_size)):
            report(ProblemKind.BAD_SEGMENTATION,
                   f"RLE 'size' must be [height, width], got {rle_size!r:.60}")
            return None
        h, w = rle_size
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != h * w:
                report(ProblemKind.BAD_SEGMENTATION,
                       f"uncompressed RLE counts must be non-negative integers summing to "
                       f"{h}*{w}={h * w}")
                return None
        elif not isinstance(counts, str) or not counts:
            report(ProblemKind.BAD_SEGMENTATION,
                   f"RLE 'counts' must be a string or a list of integers, got {counts!r:.60}")
            return None
        if size is not None and (h, w) != size:
            report(ProblemKind.MASK_SIZE,
                   f"RLE size is {h}x{w} (HxW) but the image is {size[0]}x{size[1]}")
            return None
        try:
            mask = annotation_mask({"segmentation": seg}, h, w)
        except Exception as exc:  # pycocotools raises assorted types on corrupt counts
            report(ProblemKind.BAD_SEGMENTATION, f"RLE does not decode: {exc}")
            return None
        if mask.shape != (h, w):
            report(ProblemKind.BAD_SEGMENTATION,
                   f"RLE decodes to shape {mask.shape}, expected {(h, w)}")
            return None
        if not mask.any():
            report(ProblemKind.EMPTY_MASK, "RLE mask covers no pixel")
        return mask

    def check_bbox(self, bbox: Any, present: bool, size: tuple[int, int] | None,
                   mask: np.ndarray | None, report: Report) -> None:
        if not present:
            report(ProblemKind.BAD_BBOX, "bbox is missing")
            return
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            report(ProblemKind.BAD_BBOX, f"bbox must be [x, y, w, h] numbers, got {bbox!r:.60}")
            return
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            report(ProblemKind.BAD_BBOX, f"bbox {bbox} is degenerate (w and h must be > 0)")
            return
        if size is not None:
            height, width = size
            tol = BBOX_TOLERANCE_PX
            if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
                report(ProblemKind.BAD_BBOX,
                       f"bbox {bbox} reaches outside the {width}x{height} image")
                return
        if mask is not None and mask.any():
            tight = mask_bbox(mask)
            for name, given, actual, extent in zip(
                ("x", "y", "w", "h"), bbox, tight, (w, h, w, h), strict=True
            ):
                tol = max(BBOX_TOLERANCE_PX, BBOX_TOLERANCE_FRAC * extent)
                if abs(given - actual) > tol:
                    report(ProblemKind.BAD_BBOX,
                           f"bbox {[round(v, 2) for v in bbox]} disagrees with the mask's "
                           f"box {tight} ({name} off by {abs(given - actual):.1f} px)")
                    return


def validate_dataset(root: str | Path, *, workers: int | None = None, unlabelled: bool = False
                     ) -> list[Problem]:
    """Return every problem found in the dataset folder ``root`` (empty list: valid); with
    ``unlabelled``, a plain folder of images is checked as an unlabelled dataset.

    Checks the annotation file's JSON and keys, duplicate ids, that every image file exists,
    decodes completely and has the declared size, and that every annotation names a real
    image and category, has a well-formed, in-bounds, non-empty mask and a box matching it.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    return _Validator(Path(root), workers, unlabelled).run()


def format_problems(problems: list[Problem]) -> str:
    """Plain-text table of problems, one line each (for logs and exception messages)."""
    rows = [("KIND", "FILE", "IMAGE", "ANN", "MESSAGE")]
    rows += [(str(p.kind), p.file, "" if p.image_id is None else str(p.image_id),
              "" if p.ann_id is None else str(p.ann_id), p.message) for p in problems]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(r[:4], widths, strict=True))
        + "  " + r[4]
        for r in rows
    )


def ok_summary(root: str | Path) -> str:
    """One line for a dataset that passed validation (a plain folder of images included)."""
    coco = read_coco(root, unlabelled=True)
    return (f"OK: {root}: {len(coco['images'])} images, {len(coco['annotations'])} instances, "
            f"{len(coco['categories'])} categories, no problems")

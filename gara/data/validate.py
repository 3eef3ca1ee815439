"""Dataset validation: find every problem in a dataset folder, not just the first.

A dataset folder holds ``annotations.json`` (COCO instance segmentation) and the images it
names (see :mod:`gara.data.coco`), or only images (an unlabelled dataset,
:mod:`gara.data.unlabelled`). :func:`validate_dataset` decodes every image and every
mask, so a truncated JPEG or an RLE of the wrong size is caught here, before training or
evaluation trips over it hours later.
"""

from __future__ import annotations

import json
import logging
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

from gara.data.coco import (
    ANNOTATIONS_FILE,
    MAX_OVERSHOOT_PX,
    DatasetFormatError,
    annotation_mask,
    annotations_path,
    is_image_folder,
    mask_bbox,
    missing_annotations_hint,
    polygon_overshoot,
    read_coco,
)
from gara.data.images import decode_image
from gara.data.storage import DatasetStore, LocalStore, UnsafePathError, relative_name
from gara.data.unlabelled import UNREADABLE_KEY, folder_coco

log = logging.getLogger(__name__)

# How far a stored bbox may differ from the mask's tight box: polygon extents are floats and
# rasterisation rounds them, so allow a couple of pixels (or 5 % of the box on large boxes).
BBOX_TOLERANCE_PX = 2.0
BBOX_TOLERANCE_FRAC = 0.05

# An image smaller than this on either side holds nothing a prompt box or a 1024 px model can
# use (a thumbnail, an icon, a stray file).
MIN_IMAGE_SIDE = 32


class ProblemKind(StrEnum):
    MALFORMED_JSON = "malformed-json"
    MISSING_KEY = "missing-key"
    BAD_VALUE = "bad-value"
    DUPLICATE_ID = "duplicate-id"
    MISSING_FILE = "missing-file"
    OUTSIDE_FOLDER = "outside-folder"
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


class DatasetValidationError(DatasetFormatError):
    """A dataset has problems; ``problems`` holds all of them."""

    def __init__(self, root: str | Path, problems: list[Problem]) -> None:
        self.root = root  # a folder or an s3:// URL, as given
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{root}: {problems[0]}")
            return
        lines = [f"{root}: {len(problems)} dataset problem(s):"]
        lines += [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


class ImageProblemError(OSError):
    """An image entry's file cannot be used; ``problem`` says why, naming the file and image id."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(str(problem))


def decode_entry(store: DatasetStore, entry: dict[str, Any]) -> tuple[bytes, np.ndarray]:
    """An image entry's bytes and RGB pixels (:mod:`gara.data.images`: the one reader), checked
    against the dataset rules every stage shares: the file is inside the dataset, decodes
    completely within the pixel limit, has the entry's (displayed) size and is not too small.
    Anything else raises :class:`ImageProblemError`."""
    rel, image_id = entry["file_name"], entry["id"]

    def problem(kind: ProblemKind, message: str) -> ImageProblemError:
        return ImageProblemError(Problem(kind, rel, message, image_id=image_id))

    where = store.describe(rel)
    try:
        data = store.read_optional(rel)
    except UnsafePathError as exc:
        raise problem(ProblemKind.OUTSIDE_FOLDER, str(exc)) from None
    if data is None:
        raise problem(ProblemKind.MISSING_FILE, f"image file {where} does not exist")
    try:
        rgb = decode_image(data, where)
    except OSError as exc:
        raise problem(ProblemKind.UNREADABLE_IMAGE, str(exc)) from None
    height, width = rgb.shape[:2]
    if (height, width) != (entry["height"], entry["width"]):
        raise problem(ProblemKind.SIZE_MISMATCH,
                      f"image is {width}x{height} (WxH, as displayed) but the entry says "
                      f"width={entry['width']} height={entry['height']}")
    if min(height, width) < MIN_IMAGE_SIDE:
        raise problem(ProblemKind.TOO_SMALL,
                      f"image is {width}x{height}: both sides must be >= {MIN_IMAGE_SIDE} px")
    return data, rgb


def _image_problem(store: DatasetStore, entry: dict[str, Any]) -> list[Problem]:
    try:
        decode_entry(store, entry)
    except ImageProblemError as exc:
        return [exc.problem]
    return []


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
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

    def __init__(self, store: DatasetStore, workers: int, *, unlabelled: bool = False,
                 decode: bool = True) -> None:
        self.store = store
        self.root = store.root if isinstance(store, LocalStore) else None
        self.workers = workers
        self.unlabelled = unlabelled  # may the folder be a plain folder of images?
        self.plain_folder = unlabelled and self.root is not None and is_image_folder(self.root)
        self.decode = decode  # decode every image (False: the caller decodes each as it goes)
        self.problems: list[Problem] = []
        self.images: dict[Any, dict[str, Any]] = {}  # id -> entry (well-formed entries only)
        self.category_ids: set[Any] = set()
        self.clipped: list[tuple[Any, Any, float]] = []  # (image id, annotation id, px past the border)

    def add(self, kind: ProblemKind, message: str, *, file: str = ANNOTATIONS_FILE,
            image_id: Any = None, ann_id: Any = None) -> None:
        problem = Problem(kind, file, message, hashable_id(image_id), hashable_id(ann_id))
        self.problems.append(problem)

    # -- top level -------------------------------------------------------------------------
    def run(self, coco: dict[str, Any] | None = None) -> list[Problem]:
        coco = self.load_json() if coco is None else coco
        if coco is None:
            return self.problems
        images = self.top_list(coco, "images", required=True)
        annotations = self.top_list(coco, "annotations", required=True)
        categories = self.top_list(coco, "categories", required=False)
        self.check_categories(categories)
        self.check_images(images)
        self.check_annotations(annotations)
        if self.clipped:
            worst = max(px for _, _, px in self.clipped)
            ids = ", ".join(str(ann_id) for _, ann_id, _ in self.clipped[:10])
            log.warning("%s: %d polygon(s) reach up to %.2f px past the image border (annotation id %s%s); "
                        "clipped to the image (up to %g px is accepted)", self.store.describe(),
                        len(self.clipped), worst, ids, ", ..." if len(self.clipped) > 10 else "",
                        MAX_OVERSHOOT_PX)
        return self.problems

    def load_json(self) -> dict[str, Any] | None:
        assert self.root is not None, "a store's annotation file is parsed by its caller"
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
            if not is_int(cat["id"]):
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
                self.add(ProblemKind.UNREADABLE_IMAGE, entry[UNREADABLE_KEY],
                         file=entry["file_name"], image_id=image_id)
                continue
            if not is_int(image_id):
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
        if not self.decode:
            return
        # Decoding dominates the cost; PIL releases the GIL while decoding.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for found in pool.map(lambda e: _image_problem(self.store, e), good):
                self.problems.extend(found)

    def image_entry_ok(self, what: str, entry: dict[str, Any]) -> bool:
        image_id, ok = entry["id"], True
        for key in ("height", "width"):
            if not is_int(entry[key]) or entry[key] <= 0:
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
        try:
            relative_name(rel, what)
        except UnsafePathError as exc:
            self.add(ProblemKind.OUTSIDE_FOLDER, str(exc), file=rel, image_id=image_id)
            if ok:  # its annotations are still checked against it; its file is never opened
                self.images.setdefault(image_id, entry)
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
            if not is_int(ann_id):
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
        mask = self.check_segmentation(ann["segmentation"], size, report,
                                       lambda px: self.clipped.append((image_id, ann_id, px)))
        self.check_bbox(ann.get("bbox", None), "bbox" in ann, size, mask, report)

    def check_segmentation(self, seg: Any, size: tuple[int, int] | None, report: Report,
                           clipped: Callable[[float], None]) -> np.ndarray | None:
        """Check the segmentation's structure and bounds; return its mask when decodable.
        ``clipped`` hears of a polygon reaching past the border by no more than it may."""
        if isinstance(seg, list):
            return self.check_polygons(seg, size, report, clipped)
        if isinstance(seg, dict):
            return self.check_rle(seg, size, report)
        report(ProblemKind.BAD_SEGMENTATION,
               f"segmentation must be a list of polygons or an RLE object, "
               f"got {type(seg).__name__}")
        return None

    def check_polygons(self, seg: list[Any], size: tuple[int, int] | None, report: Report,
                       clipped: Callable[[float], None]) -> np.ndarray | None:
        if not seg:
            report(ProblemKind.EMPTY_MASK, "segmentation is an empty polygon list")
            return None
        for k, poly in enumerate(seg):
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(is_number(v) for v in poly)):
                report(ProblemKind.BAD_SEGMENTATION,
                       f"polygon {k} must be a flat list of >= 3 finite x,y pairs, "
                       f"got {poly!r:.80}")
                return None
        if size is None:
            return None
        height, width = size
        worst = 0.0
        for k, poly in enumerate(seg):
            past = polygon_overshoot(poly, height, width)
            if past > MAX_OVERSHOOT_PX:
                xs, ys = poly[0::2], poly[1::2]
                report(ProblemKind.MASK_OUTSIDE,
                       f"polygon {k} spans x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g}: "
                       f"{past:g} px outside the {width}x{height} image (up to {MAX_OVERSHOOT_PX:g} px "
                       "is clipped)")
                return None
            worst = max(worst, past)
        if worst > 0:
            clipped(worst)
        mask = annotation_mask({"segmentation": seg}, height, width)
        if not mask.any():
            report(ProblemKind.EMPTY_MASK, "polygons cover no pixel")
        return mask

    def check_rle(self, seg: dict[str, Any], size: tuple[int, int] | None,
                  report: Report) -> np.ndarray | None:
        rle_size, counts = seg.get("size"), seg.get("counts")
        if (not isinstance(rle_size, list) or len(rle_size) != 2
                or not all(is_int(v) and v >= 0 for v in rle_size)):
            report(ProblemKind.BAD_SEGMENTATION,
                   f"RLE 'size' must be [height, width], got {rle_size!r:.60}")
            return None
        h, w = rle_size
        if isinstance(counts, list):
            if not all(is_int(v) and v >= 0 for v in counts) or sum(counts) != h * w:
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
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
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

    Checks the annotation file's JSON and keys, duplicate ids, that every image file is inside
    the folder, exists, decodes completely (:mod:`gara.data.images`) and has the declared size,
    and that every annotation names a real image and category, has a well-formed, in-bounds,
    non-empty mask and a box matching it. A polygon reaching at most ``MAX_OVERSHOOT_PX`` past
    the border is clipped (:func:`gara.data.coco.annotation_mask`) and logged as a warning.
    """
    return _Validator(LocalStore(Path(root)), _workers(workers), unlabelled=unlabelled).run()


def validate_annotations(store: DatasetStore, coco: dict[str, Any], *, unlabelled: bool = False
                         ) -> list[Problem]:
    """The same rules for a parsed annotation file (or a plain folder's listing, ``unlabelled``)
    whose images the caller decodes one by one through :func:`decode_entry` (``gara corrupt``,
    which may read from S3)."""
    return _Validator(store, _workers(None), unlabelled=unlabelled, decode=False).run(coco)


def _workers(workers: int | None) -> int:
    return workers or min(8, os.cpu_count() or 1)


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

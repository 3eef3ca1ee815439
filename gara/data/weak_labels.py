"""Weak labels: what WeSAM trains from instead of masks (shared/methods/wesam.md).

A weak-label sample holds, per instance, only what an annotator would give:

- ``box``: the annotation's ``bbox`` (a bbox-only dataset is enough);
- ``point``: ``n`` positive clicks inside the instance and ``n`` negative clicks outside it;
- ``polygon``: the box around a coarse polygon (Douglas-Peucker at 5 % of the outline, as
  WeSAM's code).

Boxes never rasterise anything, and a COCO polygon ``segmentation`` gives its coarse polygon
from the vertices alone. Clicks (and the outline of an RLE mask) are simulated from the
``segmentation`` once per annotation, seeded by its id, the way an annotator would have drawn
them; the mask is dropped right there. A :class:`WeakSample` has no ``masks`` key, so the
trainer cannot read one (``gara.train.wesam`` refuses samples that carry masks).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, TypedDict

import cv2
import numpy as np
import torch

from gara.data.coco import DatasetFormatError, annotation_mask, annotations_path, read_coco
from gara.data.dataset import AnnotatedImages, OnError, instance_fields
from gara.data.prompts import positive_points
from gara.data.storage import relative_name
from gara.models.segmenter import Prompts
from gara.seeding import seeded_rng

logger = logging.getLogger(__name__)

WeakLabelKind = Literal["box", "point", "polygon"]
WEAK_LABEL_KINDS: tuple[WeakLabelKind, ...] = ("box", "point", "polygon")
COARSE_EPSILON = 0.05  # Douglas-Peucker tolerance as a fraction of the outline's perimeter
BBOX_TOLERANCE_PX = 2.0  # a bbox may overhang the image by rounding (as gara.data.validate)
MAX_LISTED = 20  # problems named in one error message
IMAGE_KEYS = ("id", "file_name", "height", "width")


class WeakSample(TypedDict):
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (K, 4) float32 xyxy pixels, from bbox
    points: np.ndarray | None  # (K, 2n, 2) x, y: n positive then n negative clicks; None: not asked for
    point_labels: np.ndarray | None  # (K, 2n) int64, 1 = positive, 0 = negative
    polygon_boxes: np.ndarray | None  # (K, 4) float32, box around each coarse polygon
    ann_ids: np.ndarray  # (K,) int64
    iscrowd: np.ndarray  # (K,) bool
    image_id: int
    file_name: str
    meta: dict[str, Any]


def coarse_polygon_box(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """x0, y0, x1, y1 of the box around the annotation's coarse polygon(s).

    Polygons are simplified from their vertices (no raster); an RLE mask is traced first.
    A polygon that collapses to a line falls back to ``bbox`` (as WeSAM's code).
    """
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        outlines = [np.asarray(p, dtype=np.float32).reshape(-1, 1, 2) for p in seg]
        pixel_ends = 0.0  # polygon vertices are continuous coordinates
    else:
        mask = annotation_mask(ann, height, width).astype(np.uint8)
        outlines = list(cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0])
        pixel_ends = 1.0  # contour points are pixel indices: the box ends after the last pixel
    vertices = [
        cv2.approxPolyDP(o, max(COARSE_EPSILON * cv2.arcLength(o, True), 1.0), True).reshape(-1, 2)
        for o in outlines if len(o)
    ]
    if vertices:
        v = np.concatenate(vertices).astype(np.float32)
        box = np.array([v[:, 0].min(), v[:, 1].min(), v[:, 0].max() + pixel_ends, v[:, 1].max() + pixel_ends])
        box = np.clip(box, 0, [width, height, width, height]).astype(np.float32)
        if box[2] > box[0] and box[3] > box[1]:
            return box
    return bbox_xyxy(ann, height, width)


def clicks(
    ann: dict[str, Any], height: int, width: int, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """``n`` positive clicks inside the instance, then ``n`` negative ones outside it (pixel
    centres, uniform as WeSAM's sampling), seeded by (seed, annotation id); None for an empty
    mask. An instance that fills the image gets positive clicks only."""
    mask = annotation_mask(ann, height, width)
    if not mask.any():
        return None
    rng = seeded_rng("weak-clicks", seed, ann["id"])
    outside = ~mask
    negative = outside.any()
    points = np.concatenate([positive_points(mask, n, rng),
                             positive_points(outside if negative else mask, n, rng)])
    return points, np.array([1] * n + [0 if negative else 1] * n, dtype=np.int64)


def bbox_xyxy(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    x, y, w, h = (float(v) for v in ann["bbox"])
    return np.clip(np.array([x, y, x + w, y + h], dtype=np.float32), 0, [width, height, width, height])


def _bbox_problem(ann: dict[str, Any], height: int, width: int) -> str | None:
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in bbox
    ):
        return f"bbox must be [x, y, w, h] numbers, got {bbox!r:.60}"
    x, y, w, h = bbox
    tol = BBOX_TOLERANCE_PX
    if w <= 0 or h <= 0 or x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return f"bbox {bbox} is empty or outside the {width}x{height} image"
    return None


class WeakLabelDataset(AnnotatedImages):
    """Images with weak labels (``kinds``) from a dataset folder; samples carry no masks.

    Checked at load without decoding any mask: image entries, and per annotation a usable
    ``bbox`` and, for kinds derived from it, a ``segmentation``. ``on_error="fail"`` raises
    :class:`DatasetFormatError` naming each problem; ``"skip"`` leaves those images out with
    one warning each. Images are read (and their size checked) when a sample is taken.
    """

    def __init__(
        self,
        root: str | Path,
        kinds: tuple[WeakLabelKind, ...] | list[WeakLabelKind] = ("box",),
        n_points: int = 5,
        seed: int = 0,
        on_error: OnError = "fail",
    ) -> None:
        bad = [k for k in kinds if k not in WEAK_LABEL_KINDS]
        if bad or not kinds:
            raise ValueError(f"weak label kinds {list(kinds)}: choose from {WEAK_LABEL_KINDS}")
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.kinds = tuple(dict.fromkeys(kinds))
        self.n_points, self.seed = n_points, seed
        coco = read_coco(self.root)
        entries: dict[int, dict[str, Any]] = {}
        problems: dict[Any, list[str]] = {}
        for entry in coco["images"]:
            if not isinstance(entry, dict) or not all(k in entry for k in IMAGE_KEYS):
                raise DatasetFormatError(f"{annotations_path(self.root)}: image entry {entry!r:.80} lacks "
                                         "id, file_name, height or width")
            if entry["id"] in entries:  # never merge two photos' labels (the rule every stage applies)
                first = entries[entry["id"]]["file_name"]
                raise DatasetFormatError(f"{annotations_path(self.root)}: image id {entry['id']!r} is used "
                                         f"by {first} and {entry['file_name']}")
            relative_name(str(entry["file_name"]), f"{annotations_path(self.root)}: image {entry['id']}")
            entries[entry["id"]] = entry
        self._annotations: dict[int, list[dict[str, Any]]] = {i: [] for i in entries}
        for ann in coco["annotations"]:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if image_id not in entries:
                problems.setdefault(None, []).append(f"annotation {ann!r:.60} names no image entry")
                continue
            entry = entries[image_id]
            problem = _bbox_problem(ann, entry["height"], entry["width"])
            derived = [k for k in self.kinds if k != "box"]
            if problem is None and derived and not isinstance(ann.get("segmentation"), list | dict):
                problem = (f"weak label {derived[0]!r} is derived from a 'segmentation' (polygon or RLE), "
                           "and this annotation has none; use box weak labels")
            if problem is not None:
                problems.setdefault(image_id, []).append(f"annotation {ann.get('id')}: {problem}")
                continue
            self._annotations[image_id].append(ann)
        if problems and on_error == "fail":
            lines = [f"image {i}: {p}" for i, ps in problems.items() for p in ps]
            more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
            raise DatasetFormatError(f"{annotations_path(self.root)}: {len(lines)} weak-label problem(s):\n  "
                                     + "\n  ".join(lines[:MAX_LISTED]) + more)
        # image id (None: annotations naming no image) -> why it was left out
        self.skipped = {i: "; ".join(p) for i, p in problems.items()}
        for image_id, reason in self.skipped.items():
            logger.warning("skipping image %s in %s: %s", image_id, self.root, reason)
        self._entries = [e for i, e in entries.items() if i not in problems]

    def __getitem__(self, index: int) -> WeakSample:
        entry, image, anns = self._load(index)
        height, width = image.shape[:2]
        n = self.n_points
        points = labels = polygon_boxes = None
        if "point" in self.kinds:
            drawn = [clicks(a, height, width, n, self.seed) for a in anns]
            anns = [a for a, d in zip(anns, drawn, strict=True) if d is not None]  # empty masks: no clicks
            drawn = [d for d in drawn if d is not None]
            points = np.stack([p for p, _ in drawn]) if drawn else np.zeros((0, 2 * n, 2), np.float32)
            labels = np.stack([lb for _, lb in drawn]) if drawn else np.zeros((0, 2 * n), np.int64)
        if "polygon" in self.kinds:
            polygon_boxes = np.array([coarse_polygon_box(a, height, width) for a in anns],
                                     dtype=np.float32).reshape(-1, 4)
        return WeakSample(
            image=image,
            boxes=np.array([bbox_xyxy(a, height, width) for a in anns], dtype=np.float32).reshape(-1, 4),
            points=points,
            point_labels=labels,
            polygon_boxes=polygon_boxes,
            **instance_fields(entry, anns),
        )

    def __repr__(self) -> str:
        return (f"WeakLabelDataset({str(self.root)!r}, kinds={list(self.kinds)}: {len(self)} samples, "
                f"{len(self.skipped)} skipped)")


def weak_prompts(sample: WeakSample, idx: np.ndarray, kind: WeakLabelKind) -> Prompts:
    """The prompts of instances ``idx`` for one weak-label kind, in the image's pixels."""
    if kind == "box":
        return Prompts(boxes=torch.from_numpy(sample["boxes"][idx]))
    if kind == "polygon":
        if sample["polygon_boxes"] is None:
            raise ValueError("this sample was loaded without polygon weak labels")
        return Prompts(boxes=torch.from_numpy(sample["polygon_boxes"][idx]))
    if kind == "point":
        if sample["points"] is None:
            raise ValueError("this sample was loaded without point weak labels")
        return Prompts(points=torch.from_numpy(sample["points"][idx]),
                       labels=torch.from_numpy(sample["point_labels"][idx]))
    raise ValueError(f"weak label kind {kind!r}: choose one of {WEAK_LABEL_KINDS}")

"""Samples for training and evaluation: one image with its instance masks, boxes and labels.

:class:`InstanceDataset` validates the dataset folder when it is built, so a bad sample is
either a loud error (``on_error="fail"``) or a logged, counted skip (``on_error="skip"``);
it is never dropped silently. It is indexable and picklable, so a torch ``DataLoader`` can
use it directly (with :func:`collate_samples`, since images hold different instance counts);
torch itself is not imported here.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np

from gara.data.coco import annotation_mask, read_coco
from gara.data.storage import LocalStore
from gara.data.validate import (
    DatasetValidationError,
    Problem,
    decode_entry,
    format_problems,
    hashable_id,
    validate_dataset,
)

logger = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]

# Keys of a COCO image entry; anything else (``corruption``, ``severity``, ``source``...)
# is passed through in ``Sample["meta"]``.
STANDARD_IMAGE_KEYS = frozenset(
    {"id", "file_name", "height", "width", "license", "flickr_url", "coco_url", "date_captured"}
)


class Sample(TypedDict):
    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (K, H, W) bool
    boxes: np.ndarray  # (K, 4) float32, xyxy in pixels
    category_ids: np.ndarray  # (K,) int64
    ann_ids: np.ndarray  # (K,) int64
    iscrowd: np.ndarray  # (K,) bool
    image_id: int
    file_name: str
    meta: dict[str, Any]  # the image entry's extra keys, e.g. corruption, severity


@dataclass(frozen=True)
class Skipped:
    """A sample (or an orphan annotation) left out under ``on_error="skip"``, and why."""

    file: str
    image_id: Any
    ann_id: Any
    reason: str


class AnnotatedImages:
    """What every dataset kind holds once its annotation file is checked: the kept image
    entries, in order, and each one's annotations. Subclasses turn one into a sample."""

    root: Path
    _entries: list[dict[str, Any]]
    _annotations: dict[Any, list[dict[str, Any]]]

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, index: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(image entry, annotations) of sample ``index``, without decoding the image."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples in {self.root}")
        entry = self._entries[index]
        return entry, self._annotations[entry["id"]]

    def _load(self, index: int) -> tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]:
        """(entry, RGB image, annotations) of sample ``index``."""
        entry, anns = self.entry(index)
        return entry, read_entry_image(self.root, entry), anns


def read_entry_image(root: Path, entry: dict[str, Any]) -> np.ndarray:
    """The RGB image of a (validated) image entry, by the rules validation applied: a file that
    changed since fails loudly (ImageProblemError) rather than mis-aligning labels."""
    return decode_entry(LocalStore(root), entry)[1]


def instance_fields(entry: dict[str, Any], anns: list[dict[str, Any]]) -> dict[str, Any]:
    """The sample fields every dataset kind shares: ids, crowd flags, file name, extra metadata."""
    return {
        "ann_ids": np.array([a["id"] for a in anns], dtype=np.int64),
        "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        "image_id": int(entry["id"]),
        "file_name": str(entry["file_name"]),
        "meta": {k: v for k, v in entry.items() if k not in STANDARD_IMAGE_KEYS},
    }


def collate_samples(batch: list[Sample]) -> list[Sample]:
    """DataLoader ``collate_fn``: keep the batch as a list (instance counts differ)."""
    return list(batch)


class InstanceDataset(AnnotatedImages):
    """Images with instance masks from a dataset folder (``annotations.json`` + images).

    ``on_error="fail"`` raises :class:`DatasetValidationError` listing every problem;
    ``on_error="skip"`` leaves out each image with a problem (and annotations naming no
    image), logs one warning per skip and records them in ``skipped``. Problems that belong
    to no image (a broken annotation file, duplicate category ids) raise in both modes.
    """

    def __init__(self, root: str | Path, on_error: OnError = "fail") -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.on_error: OnError = on_error
        self.problems: list[Problem] = validate_dataset(self.root)
        self.skipped: list[Skipped] = []
        if self.problems and on_error == "fail":
            raise DatasetValidationError(self.root, self.problems)
        fatal = [p for p in self.problems if p.image_id is None and p.ann_id is None]
        if fatal:
            raise DatasetValidationError(self.root, fatal)

        coco = read_coco(self.root)
        self.categories: dict[int, str] = {c["id"]: c["name"] for c in coco["categories"]}
        bad_images = self._skip_problems(coco)
        # Entries without problems are well-formed (dicts with int ids), and so are the
        # annotations that name them: any problem there would have skipped the image.
        self._entries: list[dict[str, Any]] = [
            e for e in coco["images"] if hashable_id(e["id"]) not in bad_images
        ]
        kept = {e["id"] for e in self._entries}
        self._annotations: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in kept}
        for ann in coco["annotations"]:
            if isinstance(ann, dict) and hashable_id(ann.get("image_id")) in kept:
                self._annotations[ann["image_id"]].append(ann)

    def _skip_problems(self, coco: dict[str, Any]) -> set[Any]:
        """Record and log the skips the validation problems call for; return bad image ids."""
        files = {hashable_id(e.get("id")) for e in coco["images"] if isinstance(e, dict)}
        reasons: dict[Any, list[Problem]] = defaultdict(list)
        for problem in self.problems:
            if problem.image_id in files:
                reasons[problem.image_id].append(problem)
            else:  # an annotation that names no (valid) image: it belongs to no sample
                skip = Skipped(problem.file, problem.image_id, problem.ann_id,
                               f"[{problem.kind}] {problem.message}")
                self.skipped.append(skip)
                logger.warning("skipping annotation %s in %s (image id %s): %s",
                               skip.ann_id, self.root / skip.file, skip.image_id, skip.reason)
        for entry in coco["images"]:  # one skip per entry: a duplicated id drops them all
            image_id = hashable_id(entry.get("id")) if isinstance(entry, dict) else None
            if image_id not in reasons:
                continue
            reason = "; ".join(f"[{p.kind}] {p.message}" for p in reasons[image_id])
            skip = Skipped(str(entry.get("file_name")), image_id, None, reason)
            self.skipped.append(skip)
            logger.warning("skipping sample %s (image id %s): %s",
                           self.root / skip.file, image_id, reason)
        return set(reasons)

    @property
    def num_skipped(self) -> int:
        """How many image entries were left out under ``on_error="skip"``."""
        return sum(1 for s in self.skipped if s.ann_id is None)

    @property
    def image_ids(self) -> list[int]:
        return [e["id"] for e in self._entries]

    def problem_report(self) -> str:
        return format_problems(self.problems)

    def __getitem__(self, index: int) -> Sample:
        entry, image, anns = self._load(index)
        height, width = image.shape[:2]
        masks = np.zeros((len(anns), height, width), dtype=bool)
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        for k, ann in enumerate(anns):
            masks[k] = annotation_mask(ann, height, width)
            x, y, w, h = ann["bbox"]
            boxes[k] = (x, y, x + w, y + h)
        return Sample(
            image=image,
            masks=masks,
            boxes=boxes,
            category_ids=np.array([a["category_id"] for a in anns], dtype=np.int64),
            **instance_fields(entry, anns),
        )

    def __repr__(self) -> str:
        return (f"InstanceDataset({str(self.root)!r}, on_error={self.on_error!r}: "
                f"{len(self)} samples, {self.num_skipped} skipped)")

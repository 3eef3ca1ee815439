"""``gara predict`` in batch: a pulled model over a folder of images or a COCO file with prompts.

The output is a COCO *results* file (``pycocotools.coco.COCO.loadRes`` reads it): one entry per
prompted object with ``image_id``, ``category_id``, ``segmentation`` (compressed RLE),
``score`` (the decoder's predicted IoU) and ``effective_rank`` (mean active rank per block,
GaRA only). Entries also say where they came from (``file_name``, and ``prompt_ann_id`` for a
COCO input). The file is written atomically once every image is done.

Prompts: a COCO file gives each annotation's ``bbox`` ([x, y, w, h]) and, optionally,
``point_coords`` ([[x, y], ...]) with ``point_labels`` ([1, 0, ...]); a folder takes the same
``--box`` / ``--point`` prompts for every image.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gara.data.unlabelled import IMAGE_SUFFIXES


class BatchInputError(ValueError):
    """The folder or COCO file cannot be predicted on; the message names the file and entry."""


@dataclass
class BatchItem:
    """One image and the objects prompted in it (boxes and/or points, in the same order)."""

    image_id: int
    file_name: str
    path: Path
    boxes: list[list[float]] | None
    points: list[list[list[float]]] | None = None
    point_labels: list[list[int]] | None = None
    category_ids: list[int] = field(default_factory=list)
    ann_ids: list[Any] = field(default_factory=list)


def _inside(root: Path, relative: Any, where: str) -> Path:
    """``root / relative``, refusing names that leave ``root`` (absolute, ``..``, symlinks out)."""
    from gara.data.storage import UnsafePathError, inside

    if not isinstance(relative, str) or not relative:
        raise BatchInputError(f"{where}: file_name must be a non-empty relative path, got {relative!r}")
    try:
        path = inside(root, relative)  # the rule every dataset reader applies
    except UnsafePathError as exc:
        raise BatchInputError(f"{where}: {exc}") from None
    if not path.is_file():
        raise BatchInputError(f"{where}: image file {root / relative} does not exist")
    return path


def items_from_folder(folder: Path, boxes: list[list[float]] | None, points: list[list[list[float]]] | None,
                      labels: list[list[int]] | None) -> list[BatchItem]:
    """Every PNG/JPEG directly in ``folder`` (sorted by name), each with the same prompts."""
    if not folder.is_dir():
        raise BatchInputError(f"--images {folder}: not a folder")
    if boxes is None and points is None:
        raise BatchInputError("--images needs prompts: give --box and/or --point (applied to every image)")
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise BatchInputError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} files")
    count = len(boxes if boxes is not None else points)
    return [BatchItem(i, name, _inside(folder, name, str(folder)), boxes, points, labels,
                      category_ids=[1] * count) for i, name in enumerate(names)]


def _ann_prompts(ann: dict[str, Any], where: str) -> tuple[list[float] | None, list | None, list | None]:
    box = points = labels = None
    if ann.get("bbox") is not None:
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
            raise BatchInputError(f"{where}: bbox must be [x, y, w, h] numbers, got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise BatchInputError(f"{where}: bbox {bbox} has no area")
        box = [x, y, x + w, y + h]
    if ann.get("point_coords") is not None:
        points, labels = ann["point_coords"], ann.get("point_labels")
        if labels is None:
            labels = [1] * len(points)  # SAM's convention: clicks are foreground unless labelled
    if box is None and points is None:
        raise BatchInputError(f"{where}: no prompt (needs bbox and/or point_coords)")
    return box, points, labels


def items_from_coco(coco_file: Path, images: Path | None = None) -> list[BatchItem]:
    """One item per image that has annotations; images are looked up under ``images`` (default:
    the COCO file's folder)."""
    try:
        coco = json.loads(coco_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BatchInputError(f"--coco {coco_file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BatchInputError(f"--coco {coco_file}: not valid JSON ({exc})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) \
            or not isinstance(coco.get("annotations"), list):
        raise BatchInputError(f"--coco {coco_file}: expected an object with 'images' and 'annotations' lists")
    root = images or coco_file.parent
    entries = {}
    for entry in coco["images"]:
        if not isinstance(entry, dict) or "id" not in entry:
            raise BatchInputError(f"{coco_file}: every image entry needs an id, got {entry!r}")
        if entry["id"] in entries:
            raise BatchInputError(f"{coco_file}: image id {entry['id']!r} appears twice")
        entries[entry["id"]] = entry
    per_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in coco["annotations"]:
        if not isinstance(ann, dict):
            raise BatchInputError(f"{coco_file}: every annotation must be an object, got {ann!r}")
        image_id = ann.get("image_id")
        if image_id not in entries:
            raise BatchInputError(f"{coco_file}: annotation {ann.get('id')} names image_id {image_id!r}, "
                                  "which is not in 'images'")
        per_image[image_id].append(ann)
    items = []
    for image_id, anns in per_image.items():
        entry = entries[image_id]
        where = f"{coco_file} image {image_id}"
        prompts = [_ann_prompts(a, f"{coco_file} annotation {a.get('id')}") for a in anns]
        has_box = {p[0] is not None for p in prompts}
        has_points = {p[1] is not None for p in prompts}
        if len(has_box) > 1 or len(has_points) > 1:
            raise BatchInputError(f"{where}: mix of prompt kinds; give every annotation of an image the "
                                  "same kinds (bbox, point_coords or both)")
        items.append(BatchItem(
            image_id=image_id, file_name=entry.get("file_name"),
            path=_inside(root, entry.get("file_name"), where),
            boxes=[p[0] for p in prompts] if True in has_box else None,
            points=[p[1] for p in prompts] if True in has_points else None,
            point_labels=[p[2] for p in prompts] if True in has_points else None,
            category_ids=[int(a.get("category_id", 1)) for a in anns], ann_ids=[a.get("id") for a in anns],
        ))
    if not items:
        raise BatchInputError(f"--coco {coco_file}: no annotations to take prompts from")
    return items


def predict_items(model: Any, items: Sequence[BatchItem], progress: bool = True) -> list[dict[str, Any]]:
    """Run ``model`` (a loaded pyfunc) on every item; returns COCO result entries."""
    import numpy as np
    from tqdm import tqdm

    from gara.data.coco import mask_to_rle
    from gara.registry.model import PredictInputError, make_request

    results = []
    for item in tqdm(items, desc="predict", unit="image", disable=not progress):
        request = make_request(item.path.read_bytes(), item.boxes, item.points, item.point_labels)
        try:
            row = model.predict(request, params={"mask_format": "rle"}).iloc[0]
        except PredictInputError as exc:
            raise BatchInputError(f"{item.file_name} (image {item.image_id}): {exc.message}") from None
        ranks = row["effective_rank"] or {}
        mean_rank = sum(ranks.values()) / len(ranks) if ranks else None
        for k, (mask, score) in enumerate(zip(row["masks"], row["scores"], strict=True)):
            # Versions registered before mask_format existed ignore the param and return arrays.
            rle = mask if isinstance(mask, dict) else mask_to_rle(np.asarray(mask, dtype=bool))
            entry = {"image_id": item.image_id, "category_id": item.category_ids[k], "segmentation": rle,
                     "score": float(score), "file_name": item.file_name}
            if mean_rank is not None:
                entry["effective_rank"] = mean_rank
            if item.ann_ids:
                entry["prompt_ann_id"] = item.ann_ids[k]
            results.append(entry)
    return results

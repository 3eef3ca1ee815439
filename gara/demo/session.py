"""What the demo computes: one picture, one corruption, one object's prompts -> every column.

Columns are the frozen base and each chosen model. Models load as downstream teams load them
(:func:`gara.registry.pull.load_pyfunc`: the version's own code, adapter and checked base) and
answer through the pyfunc's ``predict``. The frozen base is not a second copy of the weights: it
is a loaded model run with its adapters switched off (:func:`gara.train.anchor.adapters_disabled`),
which is the pretrained model exactly; there is one base column per distinct base checkpoint.

A model that cannot load, an unreadable upload or a prompt outside the image is a
:class:`DemoError` (or a column's ``error``) with a one-line message for the page, never a
traceback.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gara.config import Params
from gara.data.coco import mask_bbox
from gara.data.corruptions import CORRUPTIONS, SEVERITIES, apply_corruption, check_severity, get_corruption
from gara.errors import USER_ERRORS

log = logging.getLogger(__name__)

CLEAN = "clean"  # the corruption value that leaves the picture as it is
MAX_UPLOAD_PIXELS = 4096 * 4096  # checked from the header, before any pixel is decoded
MAX_UPLOADS = 8  # uploads kept in memory (up to 0.4 GB at the pixel limit); oldest use goes first
SAMPLE_PREFIX, UPLOAD_PREFIX = "sample-", "upload-"
# The embedded held-out split (the corrupt stage's input in dvc.yaml): real photos with ground truth.
DEFAULT_SAMPLES = "data/val"


class DemoError(ValueError):
    """A request the demo cannot answer; the message is shown on the page as it is."""


@dataclass(frozen=True)
class Picture:
    """An image the page can segment, with its ground truth when it comes from a dataset."""

    id: str
    name: str  # the dataset's file_name, or an upload's id (its pixels' hash): the corruption's noise key
    image: np.ndarray  # (H, W, 3) uint8 RGB
    gt_masks: np.ndarray | None = None  # (K, H, W) bool
    gt_ids: tuple[int, ...] = ()
    gt_labels: tuple[str, ...] = ()


@dataclass
class Column:
    """One side of the side-by-side: a loaded model, the frozen base of one, or a load error."""

    name: str
    spec: str
    kind: str  # "base" | "model"
    adapter: str = "none"
    backbone: str = ""
    error: str | None = None
    pyfunc: Any = None  # mlflow PyFuncModel of a "model" column
    base_of: Any = None  # the loaded GaraSamModel whose adapters a "base" column switches off
    rank_capacity: dict[str, int] = field(default_factory=dict)  # GaRA: r_H per block

    def predict(self, request) -> Any:
        from gara.train.anchor import adapters_disabled

        if self.base_of is not None:
            with adapters_disabled(self.base_of.segmenter):
                return self.base_of.predict(None, request).iloc[0]
        return self.pyfunc.predict(request).iloc[0]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "kind": self.kind, "adapter": self.adapter,
                "backbone": self.backbone, "error": self.error}


def load_columns(params: Params, specs: list[str]) -> list[Column]:
    """Load every model spec; a spec that fails becomes a column holding its error."""
    from mlflow.exceptions import MlflowException

    from gara.registry.pull import champion_uri

    models: list[Column] = []
    bases: dict[tuple[str, str | None], Column] = {}
    for spec in specs:
        start = time.perf_counter()
        try:
            column, base_key = _load_column(params, spec)
        except (*USER_ERRORS, MlflowException) as exc:
            message = getattr(exc, "message", None) or str(exc)
            if spec == champion_uri(params) and "not found" in message:
                message += " (`make run` registers one; or name a model with --model)"
            log.warning("demo: %s", message)
            models.append(Column(spec, spec, "model", error=message))
            continue
        except Exception as exc:  # not a GaRA-SAM model, a broken code bundle...: keep the trace in the log
            log.exception("demo: %s cannot be loaded", spec)
            models.append(Column(spec, spec, "model", error=f"{spec}: cannot be loaded as a GaRA-SAM model "
                                 f"({type(exc).__name__}: {exc}); see the server log"))
            continue
        log.info("demo: loaded %s (%s on %s) in %.1f s", spec, column.adapter, column.backbone,
                 time.perf_counter() - start)
        models.append(column)
        if base_key not in bases:
            bases[base_key] = Column(f"frozen base ({column.backbone} {(base_key[1] or 'unknown')[:8]})",
                                     f"{spec}, adapters off", "base", backbone=column.backbone,
                                     base_of=column.pyfunc.unwrap_python_model())
    return [*bases.values(), *models]


def _load_column(params: Params, spec: str) -> tuple[Column, tuple[str, str | None]]:
    """A model column and the key of its base (backbone, checkpoint sha256)."""
    from gara.registry.pull import load_pyfunc

    pyfunc = load_pyfunc(params, spec)
    loaded = pyfunc.unwrap_python_model()
    manifest = loaded.manifest  # AttributeError for a pyfunc that is not ours: its column's error
    adapter = manifest.adapter.kind if manifest.adapter else "none"
    column = Column(spec, spec, "model", adapter, manifest.backbone, pyfunc=pyfunc,
                    rank_capacity=_rank_capacity(loaded.segmenter))
    return column, (manifest.backbone, manifest.base_checkpoint_sha256)


def _rank_capacity(segmenter) -> dict[str, int]:
    from gara.models.adapters.gara import GaRALinear
    from gara.models.inject import adapter_layers
    from gara.train.loop import block_name

    return {block_name(name): layer.high_rank for name, layer in adapter_layers(segmenter).items()
            if isinstance(layer, GaRALinear)}


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """Upload bytes -> RGB uint8 by the rules every command reads images with (upright, EXIF
    orientation applied: :mod:`gara.data.images`), within the demo's smaller pixel limit."""
    from gara.data.images import decode_image

    try:
        return decode_image(data, name, max_pixels=MAX_UPLOAD_PIXELS)
    except OSError as exc:
        raise DemoError(str(exc)) from None


class SampleSet:
    """The dataset the page offers as samples: images with ground-truth instances."""

    def __init__(self, root: Path) -> None:
        from gara.data.dataset import InstanceDataset

        self.root = root
        self.dataset = InstanceDataset(root, on_error="skip")
        self._index = {f"{SAMPLE_PREFIX}{image_id}": i for i, image_id in enumerate(self.dataset.image_ids)}

    def listing(self) -> list[dict[str, Any]]:
        rows = []
        for picture_id, index in self._index.items():
            entry, anns = self.dataset.entry(index)
            rows.append({
                "id": picture_id, "name": entry["file_name"],
                "width": entry["width"], "height": entry["height"],
                "annotations": [{"id": a["id"], "label": self.dataset.categories.get(a["category_id"], "?"),
                                 "box": _xyxy(a["bbox"])} for a in anns if not a.get("iscrowd", 0)],
            })
        return rows

    def get(self, picture_id: str) -> Picture | None:
        if picture_id not in self._index:
            return None
        sample = self.dataset[self._index[picture_id]]
        objects = ~sample["iscrowd"]  # crowd regions are no single object to prompt or score
        labels = tuple(self.dataset.categories.get(int(c), "?") for c in sample["category_ids"][objects])
        return Picture(picture_id, sample["file_name"], sample["image"], sample["masks"][objects],
                       tuple(int(i) for i in sample["ann_ids"][objects]), labels)


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [float(x), float(y), float(x + w), float(y + h)]


class DemoSession:
    """Columns, samples and uploads behind the page. One comparison runs at a time: the base
    columns switch adapters off on a shared model (and a CPU has nothing to gain from two)."""

    def __init__(self, columns: list[Column], samples: SampleSet | None, seed: int,
                 samples_note: str = "") -> None:
        self.columns = columns
        self.samples = samples
        self.samples_note = samples_note
        self.seed = seed
        self._uploads: OrderedDict[str, Picture] = OrderedDict()
        self._uploads_lock = threading.Lock()  # short: uploads never wait for a comparison
        self._models_lock = threading.Lock()

    @classmethod
    def open(cls, params: Params, specs: list[str], data: Path | None = None) -> DemoSession:
        """Samples from ``data`` (None: DEFAULT_SAMPLES, or none with a note when it is absent)."""
        samples, note = None, ""
        folder = Path(DEFAULT_SAMPLES) if data is None else data
        if (folder / "annotations.json").is_file():
            samples = SampleSet(folder)
        elif data is not None:
            raise DemoError(f"--data {data}: no annotations.json there; give a dataset folder")
        else:
            note = f"no samples: {folder} is missing (`dvc pull data.dvc` fetches it); upload a photo instead"
        return cls(load_columns(params, specs), samples, params.corrupt.seed, note)

    # -- what the page lists -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "columns": [c.describe() for c in self.columns],
            "corruptions": [{"name": CLEAN, "levels": []}] + [
                {"name": c.name, "levels": list(c.levels)} for c in CORRUPTIONS.values()],
            "severities": list(SEVERITIES),
            "samples": self.samples.listing() if self.samples else [],
            "samples_note": self.samples_note,
            "max_upload_pixels": MAX_UPLOAD_PIXELS,
        }

    # -- pictures ------------------------------------------------------------------------
    def add_upload(self, data: bytes, name: str) -> Picture:
        image = decode_upload(data, name)
        digest = hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()
        picture_id = f"{UPLOAD_PREFIX}{digest[:16]}"
        with self._uploads_lock:
            picture = self._uploads.pop(picture_id, None) or Picture(picture_id, picture_id, image)
            self._uploads[picture_id] = picture
            while len(self._uploads) > MAX_UPLOADS:
                self._uploads.popitem(last=False)
        return picture

    def picture(self, picture_id: str) -> Picture:
        if picture_id.startswith(UPLOAD_PREFIX):
            with self._uploads_lock:
                picture = self._uploads.get(picture_id)
            if picture is None:
                raise DemoError(f"image {picture_id!r} is no longer held (the demo keeps the last "
                                f"{MAX_UPLOADS} uploads); upload it again")
            return picture
        picture = self.samples.get(picture_id) if self.samples else None
        if picture is None:
            raise DemoError(f"no sample image {picture_id!r}")
        return picture

    def view(self, picture: Picture, corruption: str, severity: int) -> Picture:
        """The picture as the models see it: corrupted by our generator (same seed and key as
        ``gara corrupt``), its ground truth warped with it for the geometric types."""
        if corruption == CLEAN:
            return picture
        try:
            get_corruption(corruption)
            check_severity(severity)
        except ValueError as exc:
            raise DemoError(str(exc)) from None
        image, masks = apply_corruption(picture.image, corruption, severity, self.seed,
                                        masks=picture.gt_masks, key=picture.name)
        return Picture(picture.id, picture.name, image, masks, picture.gt_ids, picture.gt_labels)

    # -- the comparison ------------------------------------------------------------------
    def segment(self, picture_id: str, corruption: str = CLEAN, severity: int = 3,
                box: list[float] | None = None, points: list[list[float]] | None = None,
                point_labels: list[int] | None = None, annotation_id: int | None = None) -> dict[str, Any]:
        """One object's prompts on the (corrupted) picture -> every column's mask, predicted IoU,
        effective rank per block and, with ground truth, IoU against the annotation."""
        from gara.registry.model import PredictInputError, make_request, parse_row

        view = self.view(self.picture(picture_id), corruption, severity)
        if points and (point_labels is None or len(point_labels) != len(points)):
            raise DemoError("give one label per point (1 = foreground, 0 = background)")
        target = self._target(view, box, points, point_labels, annotation_id)
        if box is None and not points:
            if target is None:
                raise DemoError("draw a box or click a point first")
            # The chosen object's tight box on the picture as shown: warped with it by the
            # geometric types, as the evaluation's box prompts are.
            box = _xyxy(mask_bbox(view.gt_masks[target[0]]))
        request = make_request(view.image, None if box is None else [box],
                               [points] if points else None, [point_labels] if points else None)
        try:
            parse_row(request.iloc[0].to_dict(), 0)  # the models' own checks, before any forward
        except PredictInputError as exc:
            raise DemoError(str(exc.message).removeprefix("row 0: ")) from None
        results = []
        with self._models_lock:
            for column in self.columns:
                results.append(self._run(column, request, view, target))
        return {
            "picture": {"id": view.id, "name": view.name, "width": int(view.image.shape[1]),
                        "height": int(view.image.shape[0]), "corruption": corruption,
                        "severity": None if corruption == CLEAN else severity},
            "prompt": {"box": box, "points": points or None,
                       "point_labels": point_labels if points else None},
            "annotation": None if target is None else {
                "id": view.gt_ids[target[0]], "label": view.gt_labels[target[0]], "how": target[1],
                "mask": view.gt_masks[target[0]]},
            "columns": results,
        }

    def _run(self, column: Column, request, view: Picture, target: tuple[int, str] | None) -> dict[str, Any]:
        from gara.evaluate.metrics import mask_iou

        out = {**column.describe(), "mask": None, "predicted_iou": None, "effective_rank": {},
               "rank_capacity": column.rank_capacity, "iou": None, "seconds": None}
        if column.error is not None:
            return out
        start = time.perf_counter()
        try:
            row = column.predict(request)
        except Exception as exc:  # one column failing must not take the others down
            log.exception("demo: %s failed", column.name)
            return {**out, "error": f"prediction failed: {getattr(exc, 'message', None) or exc}"}
        mask = np.asarray(row["masks"][0], dtype=bool)
        out.update(mask=mask, predicted_iou=float(row["scores"][0]),
                   effective_rank=dict(row["effective_rank"] or {}),
                   seconds=round(time.perf_counter() - start, 3))
        if target is not None:  # a fraction, as predicted_iou (the page shows both x 100)
            out["iou"] = mask_iou(mask, view.gt_masks[target[0]]) / 100
        return out

    @staticmethod
    def _target(view: Picture, box, points, point_labels, annotation_id) -> tuple[int, str] | None:
        """Which ground-truth instance the prompts mean: the one chosen, else the best box match
        (box IoU >= 0.5), else the smallest instance under the first foreground point."""
        if annotation_id is not None:
            if annotation_id not in view.gt_ids:
                raise DemoError(f"annotation {annotation_id} is not on {view.name}; its annotations: "
                                f"{list(view.gt_ids)}")
            return view.gt_ids.index(annotation_id), "chosen"
        if view.gt_masks is None or not len(view.gt_ids):
            return None
        if box is not None:
            overlaps = [_box_iou(box, _xyxy(mask_bbox(m))) if m.any() else 0.0 for m in view.gt_masks]
            best = int(np.argmax(overlaps))
            return (best, f"matched by box (box IoU {overlaps[best]:.2f})") if overlaps[best] >= 0.5 else None
        foreground = [p for p, label in zip(points or [], point_labels or [], strict=False) if label == 1]
        if foreground:
            x, y = (int(v) for v in foreground[0])
            hits = [k for k, m in enumerate(view.gt_masks)
                    if 0 <= y < m.shape[0] and 0 <= x < m.shape[1] and m[y, x]]
            if hits:
                k = min(hits, key=lambda i: int(view.gt_masks[i].sum()))
                return k, "under the first foreground point"
        return None


def _box_iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0

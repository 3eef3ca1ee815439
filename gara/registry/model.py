"""The model downstream teams pull: an MLflow pyfunc (models-from-code) around an adapter.

What a registered version holds (``mlflow.pyfunc.log_model`` in :mod:`gara.registry.register`):

- ``artifacts/adapter/``: ``adapter.safetensors`` + ``adapter.json`` (kind, sizes, target
  layers, backbone, base URI + sha256). The base checkpoint is referenced by a portable URI
  (``pkg://`` or ``s3://``), never copied, so a version weighs what the adapter and code weigh.
- ``artifacts/model_card.md``: what it is, its evidence against the frozen base, its limits.
- the code file :mod:`gara.registry.model_code` (models-from-code: nothing pickled) which
  instantiates :class:`GaraSamModel`, and ``code/gara.zip``, the sources of this package, so a
  puller needs only the pinned public requirements (``mlflow.pyfunc.get_model_dependencies``).
- ``model_config``: where to find the base at load time (``base_checkpoint``), overridable by
  ``mlflow.pyfunc.load_model(uri, model_config={"base_checkpoint": "s3://..."})`` or the
  ``GARA_BASE_CHECKPOINT`` environment variable. Whatever the location, the bytes must have
  the sha256 recorded in ``adapter.json`` (:class:`gara.errors.ChecksumMismatchError`).

Input (one row per image; the signature documents it)::

    image         binary   PNG / JPEG bytes of an RGB image          (required)
    boxes         [[x0, y0, x1, y1], ...] in image pixels            (optional)
    points        [[[x, y], ...], ...] one list of clicks per object (optional)
    point_labels  [[1, 0, ...], ...] 1 = foreground, 0 = background  (with points)

Boxes and points may be combined; then they describe the same objects, in order.
:func:`make_request` builds rows from NumPy images. Output (one row per image): ``masks``
(K, H, W) bool at the image's resolution, ``scores`` (K,) the decoder's predicted IoU,
``effective_rank`` {block: active rank-1 components} for GaRA adapters (empty otherwise).

``params={"mask_format": "rle"}`` returns each mask as COCO RLE (``{"size": [H, W], "counts":
str}``, pycocotools' compressed form) instead of an array: a served 4000x4000 mask is then a few
KB of JSON, not tens of MB.

A malformed request raises :class:`PredictInputError`, an ``INVALID_PARAMETER_VALUE``
MlflowException, so ``mlflow models serve`` answers HTTP 400 with its one-line message (row and
field named) and no stack trace. Any other failure is logged with its traceback on the server
and answered with a short message.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

log = logging.getLogger(__name__)

BASE_ENV = "GARA_BASE_CHECKPOINT"
ADAPTER_ARTIFACT = "adapter"
CARD_ARTIFACT = "model_card"
CODE_BUNDLE = "gara.zip"  # the package's sources, in the version's code/ folder
INPUT_COLUMNS = ("image", "boxes", "points", "point_labels")
MASK_FORMATS = ("array", "rle")


class PredictInputError(MlflowException, ValueError):
    """A predict request is malformed; the message names the row and the field (HTTP 400 when served)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def signature():
    """The model signature: RGB image bytes + optional boxes / points in; masks, scores, ranks out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Map, ParamSchema, ParamSpec, Schema

    # Prompts are typed by parse_row, not by MLflow: its enforcement refuses integer pixel
    # coordinates (JSON's [[10, 20, 80, 90]]) with a message that names neither row nor box.
    inputs = Schema([
        ColSpec(DataType.binary, "image"),
        ColSpec(AnyType(), "boxes", required=False),  # [[x0, y0, x1, y1], ...]
        ColSpec(AnyType(), "points", required=False),  # [[[x, y], ...], ...]
        ColSpec(AnyType(), "point_labels", required=False),  # [[1, 0, ...], ...]
    ])
    outputs = Schema([
        ColSpec(Array(Array(Array(DataType.boolean))), "masks"),  # or RLE dicts with mask_format=rle
        ColSpec(Array(DataType.double), "scores"),
        ColSpec(Map(DataType.double), "effective_rank", required=False),
    ])
    params = ParamSchema([ParamSpec("mask_format", DataType.string, MASK_FORMATS[0])])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def mask_format_of(params: dict[str, Any] | None) -> str:
    value = (params or {}).get("mask_format") or MASK_FORMATS[0]
    if value not in MASK_FORMATS:
        raise PredictInputError(f"params.mask_format {value!r}: expected one of {list(MASK_FORMATS)}")
    return value


# --- requests ------------------------------------------------------------------------------


def encode_image(image: np.ndarray) -> bytes:
    """RGB uint8 (H, W, 3) -> PNG bytes (lossless, so predictions match in-process ones)."""
    from PIL import Image

    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise PredictInputError(f"image must be an RGB array of shape (H, W, 3), got {shape}")
    if image.dtype != np.uint8:
        raise PredictInputError(f"image must be uint8 (0-255), got dtype {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def make_request(
    image: np.ndarray | bytes,
    boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
    points: Sequence[Sequence[Sequence[float]]] | np.ndarray | None = None,
    point_labels: Sequence[Sequence[int]] | np.ndarray | None = None,
) -> pd.DataFrame:
    """One predict row (a DataFrame) from an RGB array (or encoded bytes) and prompts."""
    row: dict[str, Any] = {"image": image if isinstance(image, bytes) else encode_image(image)}
    # Plain lists of float coordinates and int labels: JSON-serialisable, as a served request holds them.
    for key, value, dtype in (("boxes", boxes, np.float64), ("points", points, np.float64),
                              ("point_labels", point_labels, np.int64)):
        if value is not None:
            row[key] = np.asarray(value, dtype=dtype).tolist()
    return pd.DataFrame([row])


def decode_image(data: Any, row: int) -> np.ndarray:
    """A request row's encoded image -> RGB uint8 by the rules every command reads images with
    (:mod:`gara.data.images`: pixel limit, EXIF orientation applied, 16-bit and other modes
    converted), so the mask comes back in the orientation a viewer shows."""
    from gara.data.images import decode_image as decode

    if isinstance(data, np.ndarray):
        raise PredictInputError(
            f"row {row}: image must be PNG/JPEG bytes, got an array of shape {data.shape}; "
            "use gara.registry.model.make_request(image, boxes=...) to encode one"
        )
    if not isinstance(data, bytes | bytearray) or not data:
        raise PredictInputError(
            f"row {row}: image must be non-empty PNG/JPEG bytes, got {type(data).__name__}")
    try:
        return decode(bytes(data), f"row {row}: image")
    except OSError as exc:
        raise PredictInputError(str(exc)) from None


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, list | tuple | np.ndarray) and len(value) == 0


def _as_array(value: Any, row: int, field: str, ndim: int, last: int | None, dtype) -> np.ndarray:
    try:
        array = np.asarray(value.tolist() if isinstance(value, np.ndarray) else value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise PredictInputError(f"row {row}: {field} is not a numeric {ndim}-D list: {exc}") from None
    if array.ndim != ndim or (last is not None and array.shape[-1] != last):
        want = {2: "(K, 4)" if last == 4 else "(K, P)", 3: "(K, P, 2)"}[ndim]
        raise PredictInputError(f"row {row}: {field} must have shape {want}, got {array.shape}")
    if not np.isfinite(array).all():
        raise PredictInputError(f"row {row}: {field} holds NaN or infinite values")
    return array


def parse_row(record: dict[str, Any], row: int):
    """One input row -> (image, Prompts) with every check a user can act on."""
    import torch

    from gara.models.segmenter import Prompts

    unknown = sorted(set(record) - set(INPUT_COLUMNS))
    if unknown:
        raise PredictInputError(f"row {row}: unknown field(s) {unknown}; expected {list(INPUT_COLUMNS)}")
    image = decode_image(record.get("image"), row)
    boxes = points = labels = None
    if not _is_missing(record.get("boxes")):
        boxes = _as_array(record["boxes"], row, "boxes", 2, 4, np.float32)
    if not _is_missing(record.get("points")):
        points = _as_array(record["points"], row, "points", 3, 2, np.float32)
        if _is_missing(record.get("point_labels")):
            raise PredictInputError(f"row {row}: points need point_labels (1 = foreground, 0 = background)")
        labels = _as_array(record["point_labels"], row, "point_labels", 2, None, np.int64)
        if labels.shape != points.shape[:2]:
            raise PredictInputError(
                f"row {row}: point_labels shape {labels.shape} does not match points {points.shape[:2]}")
        if not np.isin(labels, (0, 1)).all():
            raise PredictInputError(
                f"row {row}: point_labels must be 0 or 1, got {sorted(set(labels.ravel().tolist()))}")
    if boxes is None and points is None:
        raise PredictInputError(f"row {row}: no prompts; give boxes and/or points (with point_labels)")
    try:
        prompts = Prompts(
            boxes=None if boxes is None else torch.from_numpy(boxes),
            points=None if points is None else torch.from_numpy(points),
            labels=None if labels is None else torch.from_numpy(labels),
        )
        prompts.check_inside(image.shape[:2])
    except ValueError as exc:
        raise PredictInputError(f"row {row}: {exc}") from None
    return image, prompts


def records_of(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return model_input
    raise PredictInputError(
        f"expected a DataFrame, a dict or a list of dicts with {list(INPUT_COLUMNS)}, "
        f"got {type(model_input).__name__}"
    )


# --- the pyfunc model ----------------------------------------------------------------------


class GaraSamModel(PythonModel):
    """Frozen SAM-family base + adapter, rebuilt from the version's artifacts at load time."""

    def load_context(self, context) -> None:
        from gara.allocator import keep_freed_memory
        from gara.models.adapter_io import load_adapted_segmenter, read_manifest

        keep_freed_memory()

        config = dict(context.model_config or {})
        adapter_dir = context.artifacts[ADAPTER_ARTIFACT]
        manifest = read_manifest(adapter_dir)
        # Where the base lives on *this* machine: load-time config, then the environment,
        # then the URI recorded at training time (or the backbone's packaged weights).
        checkpoint = config.get("base_checkpoint") or os.environ.get(BASE_ENV) or None
        if checkpoint is None and manifest.base_checkpoint and not _exists_here(manifest.base_checkpoint):
            checkpoint = _packaged_checkpoint(manifest.backbone)
        self.segmenter = load_adapted_segmenter(
            adapter_dir, checkpoint=checkpoint, s3_endpoint_url=config.get("s3_endpoint_url"))
        self.segmenter.eval()
        self.manifest = manifest

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        mask_format = mask_format_of(params)
        rows = []
        for i, record in enumerate(records_of(model_input)):
            image, prompts = parse_row(record, i)
            try:
                rows.append(self._predict_row(image, prompts, mask_format))
            except Exception as exc:  # not the request's fault: keep the trace on the server
                log.exception("row %d: prediction failed", i)
                raise MlflowException(f"row {i}: prediction failed ({type(exc).__name__}); see the server "
                                      "log", error_code=INTERNAL_ERROR) from None
        return pd.DataFrame(rows, columns=["masks", "scores", "effective_rank"])

    def _predict_row(self, image: np.ndarray, prompts, mask_format: str) -> dict[str, Any]:
        import torch

        from gara.data.coco import mask_to_rle
        from gara.models.adapters.gara import effective_ranks
        from gara.train.loop import block_name

        with torch.inference_mode():
            masks, scores = self.segmenter.predict(image, prompts)
            ranks = effective_ranks(self.segmenter, 1)
        return {
            "masks": [mask_to_rle(m) for m in masks] if mask_format == "rle" else masks,
            "scores": scores.astype(np.float64),
            "effective_rank": {block_name(k): float(v[0]) for k, v in ranks.items()},
        }


def _exists_here(uri: str) -> bool:
    return "://" in uri or os.path.isfile(uri)


def _packaged_checkpoint(backbone: str) -> str | None:
    """A recorded local path that is absent here (another machine's site-packages) falls back
    to the same backbone's packaged weights; the recorded sha256 still has to match."""
    from gara.models.backbones import get_backbone_spec

    spec = get_backbone_spec(backbone)
    return spec.default_checkpoint() if spec.default_checkpoint else None

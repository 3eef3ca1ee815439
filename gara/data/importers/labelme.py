"""labelme annotation folders: one JSON per image, each holding ``shapes``.

Polygons, rectangles (two corners -> four-point polygon) and circles (centre + a point on the rim
-> a 32-gon) become instances; shapes with the same label and non-null ``group_id`` form one
instance (labelme's way of drawing an object in parts). Lines and points have no area and are
skipped with a reason. The image is ``imagePath`` (relative to the JSON, normalised within SRC;
``--images`` is a second place to look for its file name); when that file is absent the
embedded ``imageData`` is written instead. Categories are the labels, sorted, ids 1..N.
"""

from __future__ import annotations

import base64
import io
import math
import posixpath
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from gara.data.coco import DatasetFormatError
from gara.data.importers.writer import (
    Skip,
    SourceData,
    SourceImage,
    SourceInstance,
    listed,
    need,
    read_json,
)
from gara.data.validate import is_int

CIRCLE_VERTICES = 32
AREA_SHAPES = ("polygon", "rectangle", "circle")


def read(src: Path, images: Path | None, skip: Skip) -> SourceData:
    files = listed(src, "*.json", "labelme", "labelme JSON files")
    docs = []
    for path in files:  # first pass: every label, so category ids are known before any image
        rel = path.relative_to(src).as_posix()
        doc = need(read_json(path), ("shapes",), str(path))
        if not isinstance(doc["shapes"], list):
            raise DatasetFormatError(f"{path}: key 'shapes' must be a list")
        # reread only if needed: it can be large (anything but base64 text is unusable)
        doc["imageData"] = isinstance(doc.get("imageData"), str) and bool(doc["imageData"])
        docs.append((path, rel, doc, _instances(path, rel, doc["shapes"], skip)))
    labels = sorted({label for *_, parts in docs for label, _ in parts.values()})
    ids = {label: i for i, label in enumerate(labels, start=1)}
    categories = {i: {"id": i, "name": label} for label, i in ids.items()}

    def generate():
        for path, rel, doc, parts in docs:
            instances = [SourceInstance(ids[label], polygons, key)
                         for key, (label, polygons) in parts.items()]
            yield _image(src, images, path, rel, doc, instances)

    return SourceData(generate(), categories, len(docs))


def _image(src: Path, images: Path | None, path: Path, rel: str, doc: dict[str, Any],
           instances: list[SourceInstance]) -> SourceImage:
    image_path = str(doc.get("imagePath") or "").replace("\\", "/")
    size = (doc.get("imageHeight"), doc.get("imageWidth"))
    stated = all(is_int(v) and v > 0 for v in size)

    def embedded() -> bytes:  # reread: the first pass dropped imageData to keep memory small
        return base64.b64decode(read_json(path)["imageData"], validate=True)

    data = embedded if doc["imageData"] else None
    if image_path:
        name = posixpath.normpath(posixpath.join(posixpath.dirname(rel), image_path))
        files = [(src, name)] + ([(images, PurePosixPath(image_path).name)] if images is not None else [])
        what, out_name = f"{rel} (image {image_path})", name
        if name == ".." or name.startswith("../"):  # a file outside SRC is never read: --images or
            # the embedded bytes may still give the image, named after its JSON
            out_name = str(PurePosixPath(rel).with_suffix(PurePosixPath(image_path).suffix or ".png"))
    else:  # only the embedded bytes: name the file after the JSON, suffix from the bytes' format
        files, what, suffix = [], f"{rel} (embedded image)", ".png"
        if data is not None:
            try:
                raw = data()
                data, suffix = (lambda: raw), _suffix(raw)
            except ValueError:  # bad base64: the writer calls data() again and skips with the reason
                pass
        out_name = str(PurePosixPath(rel).with_suffix(suffix))
    return SourceImage(what, instances, files, out_name, data=data, size=size if stated else None)


def _suffix(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return "." + (img.format or "png").lower().replace("jpeg", "jpg")
    except Exception:  # the writer reports the unreadable bytes
        return ".png"


def _instances(path: Path, rel: str, shapes: list[Any], skip: Skip
               ) -> dict[str, tuple[str, list[list[float]]]]:
    """key -> (label, polygons): one entry per instance, grouped shapes merged."""
    found: dict[str, tuple[str, list[list[float]]]] = {}
    for index, shape in enumerate(shapes):
        where = f"{path}: shapes[{index}]"
        need(shape, ("label", "points"), where)
        label, kind, group = str(shape["label"]), shape.get("shape_type") or "polygon", shape.get("group_id")
        what = f"{rel} shape {index} ({kind} {label!r})"
        if kind not in AREA_SHAPES:
            skip(what, f"shape_type {kind!r} has no area; only {', '.join(AREA_SHAPES)} shapes become "
                       "instances")
            continue
        points = shape["points"]
        if not (isinstance(points, list) and all(
                isinstance(p, list) and len(p) >= 2 and all(isinstance(v, int | float) for v in p[:2])
                for p in points)):
            raise DatasetFormatError(f"{where}: 'points' must be a list of [x, y] pairs")
        polygon = _polygon(kind, [(float(p[0]), float(p[1])) for p in points])
        if polygon is None:
            skip(what, f"{len(points)} point(s) do not make a {kind}")
            continue
        key = f"group {group} ({label})" if group is not None else f"shape {index}"
        found.setdefault(key, (label, []))[1].append(polygon)
    return found


def _polygon(kind: str, points: list[tuple[float, float]]) -> list[float] | None:
    """A flat COCO polygon for one shape, or None when the points are too few."""
    if kind == "rectangle":
        if len(points) < 2:
            return None
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    if kind == "circle":
        if len(points) < 2:
            return None
        (cx, cy), (px, py) = points[:2]
        r = math.hypot(px - cx, py - cy)
        steps = [2 * math.pi * k / CIRCLE_VERTICES for k in range(CIRCLE_VERTICES)]
        return [v for t in steps for v in (cx + r * math.cos(t), cy + r * math.sin(t))]
    if len(points) < 3:
        return None
    return [v for p in points for v in p]

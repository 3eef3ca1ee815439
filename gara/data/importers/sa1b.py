"""SA-1B folders: ``sa_N.jpg`` beside ``sa_N.json`` (``image`` + ``annotations`` with compressed
RLE masks). The masks are class-agnostic, so there is one category, ``object``; SAM's own
per-mask scores (predicted_iou, stability_score, point_coords, crop_box) are kept on each
annotation. ``--images`` is a second place to look for the image files.
"""

from __future__ import annotations

from pathlib import Path

from gara.data.coco import DatasetFormatError
from gara.data.importers.writer import Skip, SourceData, SourceImage, SourceInstance, listed, need, read_json

CATEGORY = {"id": 1, "name": "object"}
_KEPT = ("predicted_iou", "stability_score", "point_coords", "crop_box")


def read(src: Path, images: Path | None, skip: Skip) -> SourceData:
    files = listed(src, "*.json", "sa1b", "SA-1B pairs (sa_N.jpg + sa_N.json)")

    def generate():
        for path in files:
            doc = need(read_json(path), ("image", "annotations"), str(path))
            info = need(doc["image"], ("width", "height"), f"{path}: image")
            if not isinstance(doc["annotations"], list):
                raise DatasetFormatError(f"{path}: key 'annotations' must be a list")
            rel_dir = path.parent.relative_to(src)
            name = (rel_dir / str(info.get("file_name") or f"{path.stem}.jpg")).as_posix()
            instances = []
            for index, ann in enumerate(doc["annotations"]):
                need(ann, ("segmentation",), f"{path}: annotations[{index}]")
                key = ann.get("id", f"{path.name}[{index}]")
                extra = {k: ann[k] for k in _KEPT if k in ann}
                instances.append(SourceInstance(CATEGORY["id"], ann["segmentation"], key, id=ann.get("id"),
                                                extra=extra))
            roots = [src] + ([images] if images is not None else [])
            yield SourceImage(f"image {info.get('image_id', path.stem)} ({name})", instances,
                              [(root, name) for root in roots], name, size=(info["height"], info["width"]),
                              id=info.get("image_id"))

    return SourceData(generate(), {CATEGORY["id"]: dict(CATEGORY)}, len(files))

"""Unlabelled datasets: a plain folder of images is a dataset with zero annotations.

Teams hold piles of photos without masks; label-free training (``train.method: distill``)
needs nothing more. Such a folder has no ``annotations.json``: :func:`folder_coco` lists its
images (every file below it with an image suffix, hidden files and folders left out, sorted by
path so ids are stable) as COCO image entries with their header sizes and no annotations.
``read_coco(root, unlabelled=True)`` falls back to it for the two commands that take a plain
folder (``gara data validate`` and ``gara corrupt``'s input), which then read it exactly as a
COCO file with an empty ``annotations`` list; elsewhere a missing annotations.json stays an
error. Symlinks are not followed: a link is not part of the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gara.data.images import displayed_size

UNREADABLE_KEY = "unreadable"  # set on an entry whose header did not parse
# What counts as an image file by its name, everywhere a folder of images is read.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def folder_images(root: str | Path) -> list[str]:
    """Paths (relative to ``root``, POSIX) of the image files in the folder, sorted."""
    root = Path(root)
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_symlink():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def image_entry(image_id: int, root: Path, rel: str) -> dict[str, Any]:
    """A COCO image entry sized from the file's header, as displayed (pixels are not decoded
    here). A header that cannot be read, or is over the pixel limit, gives size 0 and
    ``UNREADABLE_KEY`` holding why; validation names it."""
    try:
        width, height = displayed_size(root / rel)
    except OSError as exc:
        return {"id": image_id, "file_name": rel, "height": 0, "width": 0, UNREADABLE_KEY: str(exc)}
    return {"id": image_id, "file_name": rel, "height": height, "width": width}


def folder_coco(root: str | Path) -> dict[str, Any]:
    """The folder's images as a COCO dict with zero annotations (ids 1..N in path order)."""
    root = Path(root)
    images = [image_entry(image_id, root, rel) for image_id, rel in enumerate(folder_images(root), start=1)]
    return {"images": images, "annotations": [], "categories": []}

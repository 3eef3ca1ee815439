"""``gara data import``: turn a dataset a team already holds into this project's format.

One reader per source format (``FORMATS``) describes the images and instances it finds;
:mod:`gara.data.importers.writer` stages, checks, validates and moves the result into place, so
every format gets the same guarantees (atomic output, nothing read outside the source, bad
images and masks skipped with a reason).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gara.data.importers import cityscapes, coco_json, labelme, robustseg, sa1b
from gara.data.importers.writer import ImportSummary, ImportWriter, Skip, SourceData, check_layout

# name -> reader(SRC, --images or None, skip(what, reason)) -> SourceData
Reader = Callable[[Path, Path | None, Skip], SourceData]
FORMATS: dict[str, Reader] = {
    "coco": coco_json.read_coco,
    "lvis": coco_json.read_lvis,
    "labelme": labelme.read,
    "sa1b": sa1b.read,
    "robustseg": robustseg.read,
    "cityscapes": cityscapes.read,
}

__all__ = ["FORMATS", "ImportSummary", "import_dataset"]


def import_dataset(fmt: str, src: str | Path, out: str | Path, images: str | Path | None = None,
                   link: bool = False, progress: bool = True) -> ImportSummary:
    """Convert the ``fmt`` dataset at ``src`` (a file or folder, see each reader) into the dataset
    folder ``out``; ``images`` is where the image files live when the format keeps them apart,
    ``link`` hard-links them instead of copying. An existing ``out`` is replaced only if an
    earlier import wrote it."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out)
    image_root = Path(images) if images is not None else None
    with ImportWriter(fmt, src, out, link) as writer:  # refuses a foreign --out first
        if not src.exists():
            raise FileNotFoundError(f"{src}: no such file or folder")
        if image_root is not None and not image_root.is_dir():
            raise FileNotFoundError(f"--images {image_root}: no such folder")
        check_layout(src, out, image_root)
        return writer.write(FORMATS[fmt](src, image_root, writer.skip), progress)

"""Writing an imported dataset: the part every source format shares.

A reader (one module per format family) describes images and instances as :class:`SourceImage`
/ :class:`SourceInstance`; :class:`ImportWriter` builds the dataset from them in a hidden staging
folder next to ``--out``, checks each image and mask as it goes (a bad one is skipped with a
reason, never fatal), validates the result and only then moves it into place. So ``--out`` is
either what it was or the complete new dataset, whatever fails or interrupts the import.

Nothing outside a source root is read: a file name that is absolute, holds ``..`` or resolves
(through symlinks) outside its root is refused. Image sizes come from file headers; pixels are
decoded once, by the final validation, and masks are checked and boxed on their RLE.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils
from tqdm import tqdm

from gara.data.coco import (
    MAX_OVERSHOOT_PX,
    DatasetFormatError,
    clip_polygon,
    polygon_overshoot,
    refuse_foreign_output,
    write_coco,
)
from gara.data.corrupt import CLEAN
from gara.data.images import displayed_size, header_size
from gara.data.storage import LocalStore, UnsafePathError, inside, relative_name, within
from gara.data.validate import ProblemKind, format_problems, is_int, is_number, validate_dataset

OWNER_KEY = "imported"  # top-level key of annotations.json: this folder is an import's output
COMMAND = "gara data import"
# Image-level problems the final validation finds (the writer reads only headers; the image
# rules, the minimum side included, are validation's): such an image is dropped with its
# reason instead of failing the import.
_IMAGE_PROBLEMS = {ProblemKind.MISSING_FILE, ProblemKind.UNREADABLE_IMAGE, ProblemKind.SIZE_MISMATCH,
                   ProblemKind.TOO_SMALL}

Skip = Callable[[str, str], None]  # (what, reason)


@dataclass
class SourceInstance:
    """One object as the source gives it."""

    category_id: int
    segmentation: Any  # COCO polygons or RLE (compressed or not), as annotation_mask reads them
    key: Any  # the source's name for it (its id, shape index, pixel value): skip lines, variant links
    id: int | None = None  # id to keep in the output when it is free
    iscrowd: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # further annotation keys to keep


@dataclass
class SourceImage:
    """One image as the source gives it: where its file may be, what it holds."""

    what: str  # how skip lines name it, e.g. "image 12 (val2017/x.jpg)"
    instances: list[SourceInstance]
    files: list[tuple[Path, str]] = field(default_factory=list)  # (root, name inside it), first found wins
    out_name: str | None = None  # path under images/ in the output; None = the found file's name
    data: Callable[[], bytes] | None = None  # the image bytes themselves, when no file is found
    size: tuple[int, int] | None = None  # (height, width) the source states; checked against the file
    id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further image-entry keys to keep
    group: str | None = None  # variants: the key shared with their clean image (which comes first)
    corruption: str | None = None  # "clean" or a type name; None = untagged
    severity: int | None = None


@dataclass
class SourceData:
    """What a reader hands the writer. ``categories`` is read once ``images`` is consumed, so a
    reader may add categories as it meets them."""

    images: Iterable[SourceImage]
    categories: dict[int, dict[str, Any]]
    count: int | None = None  # images expected, for the progress bar


@dataclass
class ImportSummary:
    format: str
    source: str
    out: str
    images: int
    instances: int
    categories: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, reason)
    seconds: float = 0.0


# --- helpers readers share ------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """A JSON file's value; an unreadable file or bad JSON names the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OSError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path}: not valid JSON ({exc})") from exc


def need(entry: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """``entry`` as a dict holding ``keys``, or DatasetFormatError naming where and which key."""
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise DatasetFormatError(f"{where}: key {key!r} is missing")
    return entry


def listed(root: Path, pattern: str, fmt: str, holds: str) -> list[Path]:
    """The files under the folder ``root`` matching ``pattern``, sorted, hidden ones and any that
    resolve outside ``root`` left out; a ``root`` that is no folder, or holds none, is an error
    saying what ``--format fmt`` expects (``holds``)."""
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: --format {fmt} takes a folder of {holds}")
    found = []
    for path in root.rglob(pattern):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.resolve().is_relative_to(root.resolve()):
            found.append(path)
    if not found:
        raise DatasetFormatError(f"{root}: no {holds} ({pattern}) found")
    return sorted(found)


# --- masks ------------------------------------------------------------------------------------


def _encode(seg: Any, height: int, width: int) -> tuple[Any, dict[str, Any]]:
    """(segmentation to store, its pycocotools RLE), by the dataset rules (:mod:`gara.data.validate`):
    polygons of >= 3 finite x,y pairs reaching at most ``MAX_OVERSHOOT_PX`` past the border (kept
    as given; clipped when read), RLE of the image's size. Raises ValueError saying what is wrong."""
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                              and all(map(is_number, p)) for p in seg):
            raise ValueError("polygons must be flat lists of >= 3 finite x,y pairs")
        past = max(polygon_overshoot(p, height, width) for p in seg)
        if past > MAX_OVERSHOOT_PX:
            raise ValueError(f"a polygon reaches {past:g} px outside the {width}x{height} image (up to "
                             f"{MAX_OVERSHOOT_PX:g} px is clipped)")
        clipped = [clip_polygon(p, height, width) for p in seg]
        return seg, mask_utils.merge(mask_utils.frPyObjects(clipped, height, width))
    if not (isinstance(seg, dict) and "size" in seg and "counts" in seg):
        raise ValueError(f"segmentation must be polygons or RLE, got {type(seg).__name__}")
    if seg["size"] != [height, width]:
        raise ValueError(f"mask is {seg['size']} (HxW) but the image is {[height, width]}")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
            raise ValueError(f"uncompressed RLE counts must be non-negative integers summing to "
                             f"{height * width}")
        return seg, mask_utils.frPyObjects(seg, height, width)
    if not isinstance(counts, str) or not counts:
        raise ValueError("RLE counts must be a string or a list of integers")
    return seg, {"size": [height, width], "counts": counts.encode("ascii")}


def _header_size(path: Path | None, data: bytes | None, what: str) -> tuple[int, int]:
    """(height, width) as displayed, from the header, by the reader's rules (pixel limit, EXIF
    orientation: :mod:`gara.data.images`); pixels are not decoded."""
    if path is not None:
        width, height = displayed_size(path)
    else:
        width, height = header_size(data or b"", what)
    return height, width


# --- the writer -------------------------------------------------------------------------------


class ImportWriter:
    """Stages one import; use as a context manager (the staging folder goes on any failure)."""

    def __init__(self, fmt: str, src: Path, out: Path, link: bool = False) -> None:
        out = Path(os.path.abspath(out))  # a name to move things beside, even for "." or "a/.."
        refuse_foreign_output(LocalStore(out), OWNER_KEY, COMMAND)  # before anything else
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out}: exists and is not a folder")
        self.fmt, self.src, self.out, self.link = fmt, src, out, link
        self.start = time.perf_counter()
        self.staging = out.parent / f".{out.name}.importing-{uuid.uuid4().hex[:12]}"
        self.skipped: list[tuple[str, str]] = []
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self._what: dict[int, str] = {}  # output image id -> how skip lines name it
        self._names: set[str] = set()
        self._image_ids: set[int] = set()
        self._ann_ids: set[int] = set()
        self._groups: dict[str, tuple[int, dict[Any, int]]] = {}  # group -> (clean id, key -> ann id)

    def __enter__(self) -> ImportWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append((what, reason))

    def write(self, data: SourceData, progress: bool = True) -> ImportSummary:
        """Add every image, validate, move into place; the summary of what was written."""
        for image in tqdm(data.images, total=data.count, desc=f"import {self.fmt}", unit="img",
                          disable=not progress):
            self.add(image, data.categories)
        categories = [data.categories[k] for k in sorted(data.categories)]
        coco = {"images": self.images, "annotations": self.annotations, "categories": categories,
                OWNER_KEY: {"format": self.fmt, "source": str(self.src)}}
        write_coco(self.staging, coco)
        problems = validate_dataset(self.staging)  # decodes every image and mask, once
        if self._drop_undecodable(problems):
            write_coco(self.staging, coco)
            problems = validate_dataset(self.staging)
        if not self.images:
            first = "; first: {}: {}".format(*self.skipped[0]) if self.skipped else ""
            raise DatasetFormatError(f"{self.src}: no image could be imported ({len(self.skipped)} skipped"
                                     f"{first}); nothing was written to {self.out}")
        if problems:
            raise DatasetFormatError(f"{self.src}: the imported dataset does not validate; nothing was "
                                     f"written to {self.out}:\n{format_problems(problems)}")
        self._move_into_place()
        return ImportSummary(self.fmt, str(self.src), str(self.out), len(self.images), len(self.annotations),
                             len(categories), self.skipped, round(time.perf_counter() - self.start, 3))

    # -- one image ---------------------------------------------------------------------------
    def add(self, image: SourceImage, categories: dict[int, dict[str, Any]]) -> None:
        n = len(image.instances)
        what = image.what + (f" and its {n} instance(s)" if n else "")
        clean = self._groups.get(image.group) if image.corruption not in (None, CLEAN) else None
        if image.corruption not in (None, CLEAN) and clean is None:
            self.skip(what, "its clean image was skipped")
            return
        try:
            path, name = self._locate(image)
            data = image.data() if path is None and image.data is not None else None
            height, width = _header_size(path, data, image.what)
            rel = f"images/{relative_name(image.out_name or name, image.what)}"
        except (OSError, ValueError) as exc:  # UnsafePathError is a ValueError
            self.skip(what, str(exc))
            return
        if image.size is not None and tuple(image.size) != (height, width):
            self.skip(what, f"the file is {width}x{height} (WxH) but the source says "
                            f"{image.size[1]}x{image.size[0]}")
            return
        if rel in self._names:
            self.skip(what, f"another image is already written as {rel}")
            return
        self._place(path, data, rel)
        image_id = self._take(image.id, self._image_ids)
        self._what[image_id] = image.what
        entry = {**image.extra, "id": image_id, "file_name": rel, "height": height, "width": width}
        if image.corruption is not None:
            entry.update(corruption=image.corruption, severity=image.severity,
                         source_image_id=clean[0] if clean else image_id)
        self.images.append(entry)
        links: dict[Any, int] = {}
        for inst in image.instances:
            source_ann = clean[1].get(inst.key) if clean else None
            if clean and source_ann is None:
                self.skip(f"instance {inst.key} of {image.what}", "it was skipped on the clean image")
                continue
            ann = self._annotation(inst, image, image_id, height, width, categories)
            if ann is None:
                continue
            if image.corruption is not None:
                ann["source_annotation_id"] = source_ann if clean else ann["id"]
            links[inst.key] = ann["id"]
        if image.group is not None and image.corruption == CLEAN:
            self._groups[image.group] = (image_id, links)

    def _locate(self, image: SourceImage) -> tuple[Path | None, str]:
        """The first candidate file that exists (refusing unsafe names), else the bytes fallback."""
        refused = []
        for root, name in image.files:
            try:
                path = inside(root, name)
            except UnsafePathError as exc:  # never opened; the next candidate may do
                refused.append(str(exc))
                continue
            if path.is_file():
                return path, name
        if image.data is not None:
            return None, image.out_name or ""
        if refused:
            raise UnsafePathError("; ".join(refused))
        tried = ", ".join(str(root / name) for root, name in image.files) or "no candidate path"
        raise FileNotFoundError(f"image file missing (tried {tried})")

    def _place(self, path: Path | None, data: bytes | None, rel: str) -> None:
        target = self.staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path is None:
            target.write_bytes(data or b"")
        elif self.link:
            try:
                os.link(path, target)
            except OSError:  # another device, or a filesystem without hard links
                shutil.copyfile(path, target)
        else:
            shutil.copyfile(path, target)
        self._names.add(rel)

    def _annotation(self, inst: SourceInstance, image: SourceImage, image_id: int, height: int,
                    width: int, categories: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
        what = f"instance {inst.key} of {image.what}"
        if not is_int(inst.category_id) or inst.category_id not in categories:
            self.skip(what, f"category_id {inst.category_id!r} names no category")
            return None
        try:
            seg, rle = _encode(inst.segmentation, height, width)
        except ValueError as exc:
            self.skip(what, str(exc))
            return None
        try:
            area = int(mask_utils.area(rle))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
        except Exception as exc:  # pycocotools raises assorted types on corrupt counts
            self.skip(what, f"RLE does not decode ({exc})")
            return None
        if area == 0:
            self.skip(what, "empty mask")
            return None
        ann = {**inst.extra, "id": self._take(inst.id, self._ann_ids), "image_id": image_id,
               "category_id": inst.category_id, "segmentation": seg, "bbox": bbox, "area": float(area),
               "iscrowd": int(bool(inst.iscrowd))}
        self.annotations.append(ann)
        return ann

    @staticmethod
    def _take(wanted: int | None, used: set[int]) -> int:
        """``wanted`` if it is a free positive int, else the next free id."""
        if not (is_int(wanted) and wanted > 0 and wanted not in used):
            wanted = max(used, default=0) + 1
        used.add(wanted)
        return wanted

    # -- the end -------------------------------------------------------------------------------
    def _drop_undecodable(self, problems: list[Any]) -> bool:
        """Drop images the validation could not decode (with their instances and, for a clean
        image, its variants), each with its reason; True when anything was dropped."""
        bad = {p.image_id: p.message for p in problems
               if p.kind in _IMAGE_PROBLEMS and p.ann_id is None and p.image_id in self._what}
        for entry in self.images:  # variants go with their clean image
            source = entry.get("source_image_id")
            if source in bad and entry["id"] not in bad:
                bad[entry["id"]] = f"its clean image was dropped ({bad[source]})"
        for image_id, reason in bad.items():
            self.skip(self._what[image_id], reason)
        for entry in self.images:
            if entry["id"] in bad:
                (self.staging / entry["file_name"]).unlink(missing_ok=True)
        self.images[:] = [e for e in self.images if e["id"] not in bad]
        self.annotations[:] = [a for a in self.annotations if a["image_id"] not in bad]
        return bool(bad)

    def _move_into_place(self) -> None:
        """Swap the staged folder in: the old ``--out`` (empty, or an earlier import) is moved
        aside first and removed only once the new one is in place."""
        if not self.out.exists():
            os.rename(self.staging, self.out)
            return
        old = self.out.parent / f".{self.out.name}.replaced-{uuid.uuid4().hex[:12]}"
        os.rename(self.out, old)
        try:
            os.rename(self.staging, self.out)
        except BaseException:
            os.rename(old, self.out)
            raise
        shutil.rmtree(old, ignore_errors=True)


def check_layout(src: Path, out: Path, images: Path | None) -> None:
    """Refuse an ``--out`` that overlaps the source: writing there would read the output as input
    (or, on a re-import, remove the source)."""
    target = LocalStore(out)
    for root in (src, images):
        if root is not None and (within(target, LocalStore(root)) or within(LocalStore(root), target)):
            raise ValueError(f"--out {out} overlaps the source {root}; choose a folder outside it")

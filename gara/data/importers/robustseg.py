"""RobustSAM's Robust-Seg split folders, as its released loader reads them: ``clear/<stem>.jpg``
(the clean images), ``masks/<stem>.npy`` (all masks of that image, a (K, H, W) bool array; a
``masks/<stem>.png`` label map is accepted too, each distinct non-zero value one instance) and
one folder per degradation holding ``<stem>.jpg`` under the same names.

Each clean image becomes the ``clean`` entry and each degraded copy a variant of it, tagged as
``gara corrupt`` tags its own (corruption, severity, source_image_id; source_annotation_id on
the annotations). Robust-Seg has one level per type, which our protocol calls severity 3
(shared/methods/corruptions.md). Variants carry the clean image's masks unchanged: Robust-Seg
does not warp masks, even for its geometric (elastic) degradation, so neither does this import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gara.data.coco import DatasetFormatError, mask_to_rle
from gara.data.corrupt import CLEAN
from gara.data.images import MAX_IMAGE_PIXELS, displayed_size
from gara.data.importers.writer import Skip, SourceData, SourceImage, SourceInstance
from gara.data.storage import inside
from gara.data.unlabelled import IMAGE_SUFFIXES

CLEAN_DIR, MASKS_DIR = "clear", "masks"
SEVERITY = 3
# Robust-Seg folder -> our type name (gara.data.corruptions); the rest share our name, and an
# unknown folder keeps its own.
TYPE_NAMES = {"gauss_noise": "gaussian_noise", "ISO_noise": "iso_noise", "compression": "jpeg",
              "elastic_transform": "elastic", "frosted_glass_blur": "frosted_glass"}
CATEGORY = {"id": 1, "name": "object"}


def read(src: Path, images: Path | None, skip: Skip) -> SourceData:
    for folder in (CLEAN_DIR, MASKS_DIR):
        if not (src / folder).is_dir():
            raise DatasetFormatError(f"{src / folder}: missing; a Robust-Seg split folder holds "
                                     f"{CLEAN_DIR}/, {MASKS_DIR}/ and one folder per degradation")
    degradations = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")
                          and p.name not in (CLEAN_DIR, MASKS_DIR))
    cleans = _images(src / CLEAN_DIR)

    def generate():
        for name in cleans:
            stem = Path(name).stem
            try:
                masks = load_masks(src, stem)
            except (OSError, ValueError) as exc:
                skip(f"{CLEAN_DIR}/{name} and its variants", str(exc))
                continue
            instances = [SourceInstance(CATEGORY["id"], mask_to_rle(m), k) for k, m in enumerate(masks)]
            yield SourceImage(f"{CLEAN_DIR}/{name}", instances, [(src, f"{CLEAN_DIR}/{name}")],
                              group=stem, corruption=CLEAN, severity=0)
            for folder in degradations:
                found = [n for n in (f"{stem}{s}" for s in IMAGE_SUFFIXES + (".JPG", ".PNG"))
                         if (src / folder / n).is_file()]
                if not found:
                    skip(f"{folder}/{stem}", f"no degraded copy of {CLEAN_DIR}/{name} in {folder}/")
                    continue
                yield SourceImage(f"{folder}/{found[0]}", instances, [(src, f"{folder}/{found[0]}")],
                                  group=stem, corruption=TYPE_NAMES.get(folder, folder), severity=SEVERITY)

    return SourceData(generate(), {CATEGORY["id"]: dict(CATEGORY)}, len(cleans) * (1 + len(degradations)))


def _images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def load_masks(src: Path, stem: str) -> list[np.ndarray]:
    """The masks of one image: ``masks/<stem>.npy`` (K, H, W) or (H, W), else ``masks/<stem>.png``;
    a 2-D array is a label map (each distinct non-zero value one instance)."""
    npy, png = inside(src, f"{MASKS_DIR}/{stem}.npy"), inside(src, f"{MASKS_DIR}/{stem}.png")
    if npy.is_file():
        try:  # mapped, not read: its shape is checked against the pixel limit first
            array = np.load(npy, allow_pickle=False, mmap_mode="r")
        except ValueError as exc:  # object arrays need pickle: refused
            raise ValueError(f"{npy}: not a plain mask array ({exc})") from exc
        if array.ndim >= 2 and array.shape[-1] * array.shape[-2] > MAX_IMAGE_PIXELS:
            raise ValueError(f"{npy}: masks of {array.shape[-1]}x{array.shape[-2]} are over the limit of "
                             f"{MAX_IMAGE_PIXELS:,} pixels")
    elif png.is_file():
        displayed_size(png)  # the pixel limit, before decoding
        with Image.open(png) as img:
            array = np.asarray(img.convert("RGB") if img.mode in ("RGB", "RGBA", "LA") else img)
        if array.ndim == 3:  # a colour label map: one value per colour
            rgb = array[..., :3].astype(np.int64)
            array = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    else:
        raise FileNotFoundError(f"no mask file: neither {npy} nor {png} exists")
    if array.ndim == 3:
        return [layer != 0 for layer in array]
    if array.ndim == 2:
        return [array == v for v in np.unique(array) if v != 0]
    raise ValueError(f"mask array has shape {array.shape}; expected (K, H, W) or (H, W)")

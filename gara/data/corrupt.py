"""Dataset-level corruption: a dataset folder in, a corrupted dataset folder (same format) out.

Output layout (``out/``):

- ``images/clean/<stem>.png``: the clean image (corruption "clean", severity 0);
- ``images/<type>/s<severity>/<stem>.png``: every planned (type, severity), lossless PNG;
- ``annotations.json``: COCO, one image entry per variant with ``corruption``, ``severity`` and
  ``source_image_id``; annotations carry ``source_annotation_id``. Written last and atomically,
  and removed at the start of a run, so an interrupted run never looks like a finished dataset;
- ``.records/<stem>.json``: per source image, the inputs it was made from (image and annotation
  SHA-256, seed, generator version) and what each variant produced. A re-run skips a variant
  whose PNG still has the recorded hash and whose inputs are unchanged; anything else (new seed,
  edited image, new generator version) is regenerated.

Work is split per source image over a process pool (spawned workers, OpenCV single-threaded),
and every output depends only on its inputs, so 1 and N workers give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from gara.cluster import RayWorkers, map_on_actors
from gara.data.coco import (
    ANNOTATIONS_FILE,
    RECORDS_DIR,
    DatasetFormatError,
    annotation_mask,
    is_image_folder,
    mask_bbox,
    mask_to_rle,
    parse_coco,
    refuse_foreign_output,
)
from gara.data.corruptions import (
    GENERATOR_VERSION,
    apply_corruption,
    get_corruption,
    resolve_severities,
    resolve_types,
    single_threaded_cv2,
)
from gara.data.images import read_image
from gara.data.storage import DatasetStore, LocalStore, open_store, within
from gara.data.unlabelled import folder_coco
from gara.data.validate import DatasetValidationError, ImageProblemError, decode_entry, validate_annotations
from gara.fsutil import atomic_write_bytes, json_bytes
from gara.seeding import seeded_rng

log = logging.getLogger(__name__)

CLEAN = "clean"
# PNG is lossless whatever the settings; these are ~2.5x faster than OpenCV's defaults (encoding
# dominated the run time) for files ~5% larger: up-filter, zlib level 1, run-length strategy.
PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
]


@dataclass
class CorruptSummary:
    """What a ``corrupt_dataset`` run did."""

    data: str
    out: str
    source_images: int
    images: int  # image entries in the output, clean copies included
    annotations: int
    written: int  # PNGs generated in this run
    skipped: int  # PNGs reused from an earlier run with the same inputs
    removed: int  # stale PNGs of variants no longer planned
    dropped_instances: int  # instances that vanished after a geometric warp
    dropped: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _ImageTask:
    data: DatasetStore
    out: DatasetStore
    entry: dict[str, Any]
    anns: list[dict[str, Any]]
    stem: str  # output path stem relative to images/<variant>/, posix
    variants: tuple[tuple[str, int], ...]
    seed: int


# --- helpers -----------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def output_stem(file_name: str) -> str:
    """``images/a/x.jpg`` -> ``a/x``: keep sub-folders (no stem clashes), drop a leading images/."""
    parts = PurePosixPath(file_name.replace("\\", "/")).with_suffix("").parts
    if len(parts) > 1 and parts[0] == "images":
        parts = parts[1:]
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"image file_name {file_name!r} cannot be mapped to an output path")
    return "/".join(parts)


def variant_file(stem: str, corruption: str, severity: int) -> str:
    if corruption == CLEAN:
        return f"images/{CLEAN}/{stem}.png"
    return f"images/{corruption}/s{severity}/{stem}.png"


def plan_variants(
    key: str,
    types: Sequence[str],
    severities: Sequence[int],
    seed: int,
    variants_per_image: int | None,
) -> tuple[tuple[str, int], ...]:
    """The clean copy plus the full grid, or N grid cells drawn without replacement from the seed."""
    grid = [(t, s) for t in types for s in severities]
    if variants_per_image is not None:
        rng = seeded_rng("variants", key, seed)
        picked = sorted(rng.choice(len(grid), size=variants_per_image, replace=False).tolist())
        grid = [grid[i] for i in picked]
    return ((CLEAN, 0), *grid)


def balanced_order(types: Sequence[str], severities: Sequence[int], seed: int) -> list[tuple[str, int]]:
    """Every grid cell once, in rounds: each round visits every type once (types in one seeded
    order), and each type walks through its severities in its own seeded order."""
    rng = seeded_rng("balanced-variants", seed)
    type_order = [types[i] for i in rng.permutation(len(types))]
    walks = {t: [severities[i] for i in rng.permutation(len(severities))] for t in type_order}
    return [(t, walks[t][r]) for r in range(len(severities)) for t in type_order]


def plan_balanced(index: int, order: Sequence[tuple[str, int]], variants_per_image: int
                  ) -> tuple[tuple[str, int], ...]:
    """The clean copy plus the next N cells of ``balanced_order`` for the ``index``-th image.

    Consecutive images take consecutive cells, so over the dataset every type appears equally
    often (to within one) and every type's severities are spread evenly; within one image the
    N cells are N different types whenever N <= the number of types. An evaluation set, where
    a type seen on only a few photos would make its column noise, wants this; training wants
    the independent draws of :func:`plan_variants`.
    """
    start = index * variants_per_image
    return ((CLEAN, 0), *(order[(start + j) % len(order)] for j in range(variants_per_image)))


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), PNG_PARAMS)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return buf.tobytes()


# --- per-image worker --------------------------------------------------------------------


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _init_pool_worker(parent: int) -> None:
    """A pool worker exits as soon as its parent is gone: a SIGKILLed ``gara corrupt`` runs no
    clean-up, and its workers would otherwise wait on their task queue forever (and keep
    multiprocessing's resource tracker alive with them)."""
    _init_worker()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _RayCorruptWorker:
    """A Ray actor that corrupts images (OpenCV single-threaded, as the process pool's workers)."""

    def __init__(self) -> None:
        _init_worker()

    def process(self, task: _ImageTask) -> dict[str, Any]:
        return _process_image(task)


def _process_image(task: _ImageTask) -> dict[str, Any]:
    """Make (or reuse) every planned variant of one source image; return its variant results
    (or, for an image the dataset rules refuse, the problem)."""
    data, out = task.data, task.out
    try:
        raw, rgb = decode_entry(data, task.entry)
    except ImageProblemError as exc:  # reported with every other image's, after the run
        return {"variants": [], "removed": 0, "problem": exc.problem}
    height, width = int(task.entry["height"]), int(task.entry["width"])
    anns_json = json.dumps(task.anns, sort_keys=True, separators=(",", ":"))
    inputs = {
        "image_sha256": _sha256(raw),
        "annotations_sha256": _sha256(anns_json.encode("utf-8")),
        "seed": task.seed,
        "generator": GENERATOR_VERSION,
        "key": task.entry["file_name"],
    }
    record_name = f"{RECORDS_DIR}/{task.stem}.json"
    old = _load_record(out.read_optional(record_name))
    reusable = old["variants"] if old.get("inputs") == inputs else {}

    masks: np.ndarray | None = None
    results: list[dict[str, Any]] = []
    new_variants: dict[str, dict[str, Any]] = {}
    for corruption, severity in task.variants:
        vkey = f"{corruption}/s{severity}"
        rel = variant_file(task.stem, corruption, severity)
        prev = reusable.get(vkey)
        reused = prev is not None and prev.get("file") == rel
        if reused and _sha256_or_none(out.read_optional(rel)) == prev["png_sha256"]:
            entry = dict(prev)
            results.append({**entry, "corruption": corruption, "severity": severity, "written": False})
            new_variants[vkey] = entry
            continue
        geometric = corruption != CLEAN and get_corruption(corruption).geometric
        if corruption == CLEAN:
            image = rgb
        else:
            if geometric and masks is None:
                masks = _decode_masks(task.anns, height, width)
            image, warped = apply_corruption(
                rgb, corruption, severity, task.seed,
                masks=masks if geometric else None, key=task.entry["file_name"],
            )
        png = encode_png(image)
        out.write_bytes(rel, png)
        entry = {"file": rel, "png_sha256": _sha256(png), "annotations": None, "dropped": []}
        if geometric:
            assert warped is not None
            kept, dropped = [], []
            for ann, m in zip(task.anns, warped, strict=True):
                if m.any():
                    kept.append({
                        "source_id": ann["id"], "segmentation": mask_to_rle(m),
                        "bbox": mask_bbox(m), "area": float(m.sum()),
                    })
                else:
                    dropped.append(ann["id"])
            entry["annotations"], entry["dropped"] = kept, dropped
        results.append({**entry, "corruption": corruption, "severity": severity, "written": True})
        new_variants[vkey] = entry

    # Variants made earlier but no longer planned (e.g. a new seed drew other pairs): remove,
    # so the folder holds only what annotations.json names.
    removed = 0
    planned_files = {v["file"] for v in new_variants.values()}
    for vkey, prev in old.get("variants", {}).items():
        stale = prev.get("file")
        if stale and stale not in planned_files and vkey not in new_variants and out.delete(stale):
            removed += 1
    out.write_bytes(record_name, json_bytes({"inputs": inputs, "variants": new_variants}))
    return {"variants": results, "removed": removed}


def _sha256_or_none(data: bytes | None) -> str | None:
    return None if data is None else _sha256(data)


def _load_record(raw: bytes | None) -> dict[str, Any]:
    try:
        record = json.loads(raw or b"")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("variants"), dict) else {}


def _decode_masks(anns: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    if not anns:
        return np.zeros((0, height, width), dtype=bool)
    return np.stack([annotation_mask(a, height, width) for a in anns])


# --- dataset level -----------------------------------------------------------------------


def corrupt_dataset(
    data: str | Path,
    out: str | Path,
    types: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    seed: int = 0,
    variants_per_image: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    balanced: bool = False,
    ray_workers: RayWorkers | None = None,
) -> CorruptSummary:
    """Corrupt every image of the dataset ``data`` into the dataset ``out`` (each a folder or an
    ``s3://BUCKET/PREFIX``, :mod:`gara.data.storage`).

    ``types``/``severities`` default to all 17 types and 1..5. With ``variants_per_image=N``
    each image gets N (type, severity) pairs drawn from the seed instead of the full grid (the
    clean copy always); with ``balanced=True`` too, the N pairs are dealt out so that every type
    appears equally often over the dataset (:func:`plan_balanced`). ``workers`` defaults to
    all cores; workers are spawned, so a script that
    calls this with workers > 1 needs the usual ``if __name__ == "__main__":`` guard. With
    ``ray_workers`` (count > 0) the images go to that many Ray actors instead (:mod:`gara.cluster`);
    the bytes written are the same.
    """
    start = time.perf_counter()
    data_store, out_store = open_store(data), open_store(out)
    if isinstance(data_store, LocalStore):
        if not data_store.root.exists():
            raise FileNotFoundError(f"data folder {data} does not exist")
        if not data_store.root.is_dir():
            raise NotADirectoryError(f"data path {data} is not a folder")
    type_list = resolve_types(types)
    sev_list = resolve_severities(severities)
    grid_size = len(type_list) * len(sev_list)
    if variants_per_image is not None and not 1 <= variants_per_image <= grid_size:
        raise ValueError(
            f"variants_per_image {variants_per_image} must be in 1..{grid_size} "
            f"({len(type_list)} types x {len(sev_list)} severities)"
        )
    if balanced and variants_per_image is None:
        raise ValueError("balanced needs variants_per_image: the full grid is balanced already")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if within(out_store, data_store):
        raise ValueError(f"--out {out} is the input dataset {data} or inside it (a later read would take "
                         "the outputs in as photos); choose a folder outside it")
    refuse_foreign_output(out_store, "corruption", "gara corrupt", resumable=True)

    raw_coco = data_store.read_optional(ANNOTATIONS_FILE)
    if raw_coco is not None:
        coco = parse_coco(raw_coco, data_store.describe(ANNOTATIONS_FILE))
    elif isinstance(data_store, LocalStore) and is_image_folder(data_store.root):
        coco = folder_coco(data_store.root)  # unlabelled: the pairs carry no annotations
    else:
        raise DatasetFormatError(f"{data_store.describe(ANNOTATIONS_FILE)}: missing; a dataset needs "
                                 f"{ANNOTATIONS_FILE} (or, in a local folder, image files)")
    # The rules every stage applies; the images themselves are checked as each worker decodes one.
    problems = validate_annotations(data_store, coco, unlabelled=raw_coco is None)
    if problems:
        raise DatasetValidationError(data_store.describe(), problems)
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    images = sorted(coco["images"], key=lambda e: e["id"])
    order = balanced_order(type_list, sev_list, seed) if balanced else []
    if balanced and variants_per_image is not None and len(images) * variants_per_image < len(type_list):
        log.warning("balanced: %d images x %d variants cannot cover all %d types; some are left out",
                    len(images), variants_per_image, len(type_list))
    stems: dict[str, str] = {}
    tasks = []
    for index, entry in enumerate(images):
        stem = output_stem(entry["file_name"])
        if stem in stems:
            raise ValueError(
                f"images {stems[stem]!r} and {entry['file_name']!r} map to the same output "
                f"name {stem}.png; rename one"
            )
        stems[stem] = entry["file_name"]
        anns = sorted(by_image.get(entry["id"], []), key=lambda a: a["id"])
        if balanced:
            assert variants_per_image is not None
            variants = plan_balanced(index, order, variants_per_image)
        else:
            variants = plan_variants(entry["file_name"], type_list, sev_list, seed, variants_per_image)
        tasks.append(_ImageTask(data_store, out_store, entry, anns, stem, variants, seed))

    # A finished dataset is recognised by annotations.json: drop the old one before touching
    # any image, write the new one last.
    out_store.delete(ANNOTATIONS_FILE)

    if ray_workers is not None and ray_workers.count > 0:
        results = _run_on_ray(tasks, ray_workers, progress)
    else:
        n_workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
        results = _run_tasks(tasks, n_workers, progress)

    problems = [result["problem"] for result in results if "problem" in result]
    if problems:  # every other image's variants are written and will be reused by a re-run
        raise DatasetValidationError(data_store.describe(), problems)
    summary = _assemble(coco, tasks, results, type_list, sev_list, seed, variants_per_image, balanced,
                        out_store)
    summary.data, summary.out = str(data), str(out)
    summary.seconds = round(time.perf_counter() - start, 3)
    for d in summary.dropped:
        log.warning(
            "instance %s of image %s vanished under %s s%s and was dropped",
            d["source_annotation_id"], d["source_image_id"], d["corruption"], d["severity"],
        )
    return summary


def _run_tasks(tasks: list[_ImageTask], n_workers: int, progress: bool) -> list[dict[str, Any]]:
    bar = tqdm(total=len(tasks), desc="corrupt", unit="img", disable=not progress)
    results: list[dict[str, Any]] = []
    try:
        if n_workers <= 1:
            with single_threaded_cv2():
                for task in tasks:
                    results.append(_process_image(task))
                    bar.update(1)
        else:
            # spawn, not fork: forking a parent that has used OpenCV's thread pool can deadlock
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_pool_worker,
                                     initargs=(os.getpid(),)) as pool:
                for result in pool.map(_process_image, tasks, chunksize=1):
                    results.append(result)
                    bar.update(1)
    finally:
        bar.close()
    return results


def _run_on_ray(tasks: list[_ImageTask], ray_workers: RayWorkers, progress: bool) -> list[dict[str, Any]]:
    bar = tqdm(total=len(tasks), desc=f"corrupt (Ray x{ray_workers.count})", unit="img", disable=not progress)
    try:
        with ray_workers.session():
            return map_on_actors(_RayCorruptWorker, (), ray_workers.count, "process", tasks,
                                 on_result=lambda _: bar.update(1))
    finally:
        bar.close()


def _assemble(
    coco: dict[str, Any],
    tasks: list[_ImageTask],
    results: list[dict[str, Any]],
    types: list[str],
    severities: list[int],
    seed: int,
    variants_per_image: int | None,
    balanced: bool,
    out: DatasetStore,
) -> CorruptSummary:
    """Build the output COCO with fresh sequential ids (source order, then variant order)."""
    images_out, anns_out, dropped = [], [], []
    written = skipped = removed = 0
    for task, result in zip(tasks, results, strict=True):
        removed += result["removed"]
        by_id = {a["id"]: a for a in task.anns}
        for v in result["variants"]:
            written += v["written"]
            skipped += not v["written"]
            image_id = len(images_out) + 1
            images_out.append({
                **task.entry,
                "id": image_id,
                "file_name": v["file"],
                "corruption": v["corruption"],
                "severity": v["severity"],
                "source_image_id": task.entry["id"],
            })
            if v["annotations"] is None:  # photometric or clean: geometry unchanged
                new_anns = [(a, {}) for a in task.anns]
            else:
                new_anns = [
                    (by_id[k["source_id"]],
                     {"segmentation": k["segmentation"], "bbox": k["bbox"], "area": k["area"]})
                    for k in v["annotations"]
                ]
            for src, override in new_anns:
                anns_out.append({
                    **src, **override,
                    "id": len(anns_out) + 1,
                    "image_id": image_id,
                    "source_annotation_id": src["id"],
                })
            for ann_id in v["dropped"]:
                dropped.append({
                    "source_image_id": task.entry["id"],
                    "source_annotation_id": ann_id,
                    "corruption": v["corruption"],
                    "severity": v["severity"],
                })
    result_coco = {
        key: value for key, value in coco.items() if key not in ("images", "annotations")
    }
    result_coco["images"] = images_out
    result_coco["annotations"] = anns_out
    result_coco["corruption"] = {
        "seed": seed,
        "types": types,
        "severities": severities,
        "variants_per_image": variants_per_image,
        "balanced": balanced,
        "generator": GENERATOR_VERSION,
        "dropped_instances": len(dropped),
    }
    out.write_bytes(ANNOTATIONS_FILE, json_bytes(result_coco))
    return CorruptSummary(
        data="", out="", source_images=len(tasks), images=len(images_out),
        annotations=len(anns_out), written=written, skipped=skipped, removed=removed,
        dropped_instances=len(dropped), dropped=dropped,
    )


# --- contact sheet -----------------------------------------------------------------------


def render_contact_sheet(
    image: str | Path | np.ndarray,
    out_png: str | Path,
    types: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    seed: int = 0,
    cell: int = 192,
) -> Path:
    """One image under every type (rows) and severity (columns, after a clean column), labelled.

    The image is first scaled to ``cell`` px and then corrupted, so per-pixel noise stays visible
    (corrupting at full size and shrinking would average it away).
    """
    if isinstance(image, np.ndarray):
        rgb, key = image, "contact-sheet"
    else:
        path = Path(image)
        rgb, key = read_image(path), path.name
    type_list = resolve_types(types)
    sev_list = resolve_severities(severities)
    h, w = rgb.shape[:2]
    scale = cell / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    rgb = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA)
    label_w, header_h, pad = 150, 28, 4
    sheet_h = header_h + len(type_list) * (th + pad)
    sheet_w = label_w + (len(sev_list) + 1) * (tw + pad)
    sheet = np.full((sheet_h, sheet_w, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX

    def put(text: str, x: int, y: int) -> None:
        cv2.putText(sheet, text, (x, y), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)

    for j, label in enumerate([CLEAN] + [f"severity {s}" for s in sev_list]):
        put(label, label_w + j * (tw + pad) + 4, header_h - 9)
    with single_threaded_cv2():
        for i, name in enumerate(type_list):
            y = header_h + i * (th + pad)
            put(name, 6, y + th // 2 + 5)
            sheet[y : y + th, label_w : label_w + tw] = rgb
            for j, sev in enumerate(sev_list, start=1):
                x = label_w + j * (tw + pad)
                sheet[y : y + th, x : x + tw] = apply_corruption(rgb, name, sev, seed, key=key)[0]
    return atomic_write_bytes(out_png, encode_png(sheet))

"""Benchmark the corruption generator.

1. images/s per type at 512x512 on one core (process pinned to one CPU, OpenCV single-threaded);
2. the whole 17 types x 5 severities sweep of one 512x512 image on one core (goal: < 2 s);
3. dataset-level throughput (PNG writing and records included) with all cores vs 1 worker.

Run: .venv/bin/python bench/bench_corruptions.py [--images 8] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from gara.data.coco import mask_bbox, mask_to_rle, write_coco
from gara.data.corrupt import corrupt_dataset
from gara.data.corruptions import CORRUPTION_NAMES, SEVERITIES, apply_corruption

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "cat")


def photo(i: int, size: int) -> np.ndarray:
    img = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def per_type(size: int, repeats: int) -> float:
    img = photo(0, size)
    masks = np.zeros((4, size, size), bool)
    for k in range(4):
        masks[k, 40 * k : 40 * k + size // 4, 30 : 30 + size // 3] = True
    print(f"per type, {size}x{size}, one core, 5 severities x {repeats} repeats "
          "(geometric types warp 4 masks too)")
    print(f"  {'type':16s} {'ms/img':>8s} {'img/s':>8s}")
    total = 0.0
    for name in CORRUPTION_NAMES:
        start = time.perf_counter()
        for r in range(repeats):
            for s in SEVERITIES:
                apply_corruption(img, name, s, seed=r, masks=masks)
        dt = (time.perf_counter() - start) / (repeats * len(SEVERITIES))
        total += dt
        print(f"  {name:16s} {dt * 1000:8.1f} {1 / dt:8.1f}")
    return total * len(SEVERITIES)


def sweep(size: int, repeats: int) -> float:
    img = photo(1, size)
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        for name in CORRUPTION_NAMES:
            for s in SEVERITIES:
                apply_corruption(img, name, s, seed=r)
        best = min(best, time.perf_counter() - start)
    return best


def make_dataset(root: Path, n: int, size: int) -> Path:
    images, anns = [], []
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(root / f"images/{i:04d}.jpg"), photo(i, size)[..., ::-1])
        images.append({"id": i + 1, "file_name": f"images/{i:04d}.jpg", "height": size,
                       "width": size})
        for _ in range(3):
            m = np.zeros((size, size), bool)
            y, x = rng.integers(0, size // 2, size=2)
            m[y : y + size // 4, x : x + size // 5] = True
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": mask_to_rle(m), "bbox": mask_bbox(m),
                         "area": float(m.sum())})
    write_coco(root, {"images": images, "annotations": anns,
                      "categories": [{"id": 1, "name": "object"}]})
    return root


def dataset(n: int, size: int) -> None:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", n, size)
        outputs = n * (1 + len(CORRUPTION_NAMES) * len(SEVERITIES))
        print(f"dataset: {n} images {size}x{size} x (clean + 17 x 5) = {outputs} PNGs")
        times = {}
        for workers in sorted({1, cores}):
            out = Path(tmp) / f"out{workers}"
            start = time.perf_counter()
            corrupt_dataset(data, out, workers=workers, progress=False)
            times[workers] = time.perf_counter() - start
            print(f"  workers={workers}: {times[workers]:6.2f} s  "
                  f"{n / times[workers]:6.2f} src img/s  {outputs / times[workers]:7.1f} PNG/s")
        if cores > 1:
            print(f"  speed-up all cores ({cores}) vs 1 worker: {times[1] / times[cores]:.2f}x")
        identical = all(
            (Path(tmp) / "out1" / p.relative_to(Path(tmp) / f"out{cores}")).read_bytes()
            == p.read_bytes()
            for p in (Path(tmp) / f"out{cores}").rglob("*") if p.is_file()
        )
        print(f"  outputs identical across worker counts: {identical}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=8, help="dataset-level benchmark size")
    args = parser.parse_args()

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, load average {load} (other jobs skew multi-core numbers)")
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # "one core" means one core, not one thread
    cv2.setNumThreads(1)
    try:
        per_type(args.size, args.repeats)
        best = sweep(args.size, args.repeats)
        verdict = "OK" if best < 2.0 else "SLOWER THAN GOAL"
        print(f"sweep 17 types x 5 severities, one {args.size}x{args.size} image, one core: "
              f"{best:.3f} s (best of {args.repeats}; goal < 2 s: {verdict})")
    finally:
        os.sched_setaffinity(0, cpus)
    dataset(args.images, args.size)


if __name__ == "__main__":
    main()

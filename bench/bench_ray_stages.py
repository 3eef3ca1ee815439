"""Benchmark `gara corrupt` and `gara evaluate` on Ray workers against their in-process paths.

One local Ray cluster (all cores, 127.0.0.1) is started first and joined by every Ray run, so
the figures hold each run's own cost (actors starting, models built per actor, shards moving)
and not Ray's start-up (printed once). Everything runs in one process, one configuration after
the other: the ratios are measured in one run on an otherwise idle machine.

1. corrupt: N 512x512 photos under the full 17 x 5 grid: a process pool of 1 and of all cores,
   1 and 2 Ray workers, over several rounds (median and range); outputs compared byte for byte.
2. evaluate: the frozen base (LiteMedSAM by default) on N photos x (clean + 3 variants), box and
   point prompts: in process (torch's threads: all cores; and 1 thread), then 1 and 2 Ray
   workers (one CPU, one torch thread each); records compared with the 1-thread run.

Run: .venv/bin/python bench/bench_ray_stages.py [--corrupt-images 16] [--eval-images 8]
     [--repeats 3] [--backbone lite_medsam] [--part both|corrupt|evaluate]  (~15 min here)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_corruptions import make_dataset  # noqa: E402

from gara.allocator import keep_freed_memory  # noqa: E402
from gara.cluster import RayWorkers, connect  # noqa: E402
from gara.data.corrupt import corrupt_dataset  # noqa: E402

# torch and the evaluation modules are imported in bench_evaluate only: the process pool spawns
# its workers by re-importing this module, and a torch import in each would be timed as corruption.


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _timed(label: str, units: int, unit: str, run) -> tuple[float, object]:
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    print(f"  {label:34s} {seconds:7.2f} s  {units / seconds:7.2f} {unit}/s")
    return seconds, result


def bench_corrupt(data: Path, tmp: Path, n: int, repeats: int) -> None:
    pngs = n * (1 + 17 * 5)
    print(f"\ncorrupt: {n} images 512x512 x (clean + 17 types x 5 severities) = {pngs} PNGs; {repeats} "
          "rounds, the configurations in a rotated order each round; median [min, max]")
    cores = os.cpu_count() or 1
    runs = {
        "process pool, 1 worker": {"workers": 1},
        f"process pool, {cores} workers": {"workers": cores},
        "Ray, 1 worker": {"ray_workers": RayWorkers(1, None, 256)},
        "Ray, 2 workers": {"ray_workers": RayWorkers(2, None, 256)},
    }
    labels = list(runs)
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    outputs = {}
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            out = tmp / f"corrupt-{labels.index(label)}-{r}"
            start = time.perf_counter()
            corrupt_dataset(data, out, progress=False, **runs[label])
            seconds[label].append(time.perf_counter() - start)
            outputs[label] = _files(out)
            shutil.rmtree(out)
    for label in labels:
        t = sorted(seconds[label])
        print(f"  {label:34s} {statistics.median(t):7.2f} s [{t[0]:.2f}, {t[-1]:.2f}]  "
              f"{pngs / statistics.median(t):7.2f} PNG/s")

    def ratio(slow: str, fast: str) -> str:
        pairs = [a / b for a, b in zip(seconds[slow], seconds[fast], strict=True)]
        return f"{statistics.median(pairs):.2f}x [{min(pairs):.2f}, {max(pairs):.2f}]"

    pool = ratio("process pool, 1 worker", f"process pool, {cores} workers")
    print(f"  speed-up, per round: Ray 2 vs 1 worker {ratio('Ray, 1 worker', 'Ray, 2 workers')}; "
          f"process pool {cores} vs 1 {pool}")
    reference = outputs["process pool, 1 worker"]
    print(f"  identical bytes in every configuration: {all(o == reference for o in outputs.values())}")


def bench_evaluate(data: Path, tmp: Path, backbone: str) -> None:
    import torch

    from gara.config import EvaluateConfig, ModelConfig
    from gara.evaluate.runner import evaluate_models, evaluate_on_ray, resolve_models

    variants = tmp / "eval-data"
    corrupt_dataset(data, variants, variants_per_image=3, balanced=True, workers=1, progress=False)
    config = EvaluateConfig(overlay_images=0, mixed_precision="no")  # fp32: bf16 is CPU-dependent
    model = ModelConfig(backbone=backbone)
    models = resolve_models(["base"], model)
    warm = config.model_copy(update={"max_images": 1})
    n = len(evaluate_models(models, variants, warm, progress=False).images)
    images = len(list((variants / "images").rglob("*.png")))
    print(f"\nevaluate: {backbone} base, {images} images (clean + 3 variants each), box + point prompts, "
          f"batch {config.batch_size}, fp32 (warm-up on {n} images done)")
    threads = torch.get_num_threads()
    seconds = {}
    seconds["in process"], full = _timed(f"in process, {threads} torch threads", images, "img",
                                         lambda: evaluate_models(models, variants, config, progress=False))
    torch.set_num_threads(1)
    seconds["1 thread"], one = _timed("in process, 1 torch thread", images, "img",
                                      lambda: evaluate_models(models, variants, config, progress=False))
    torch.set_num_threads(threads)
    one_source = config.model_copy(update={"max_images": 1})
    seconds["start-up"], _ = _timed(f"Ray, 1 worker, 1 source ({n} images)", n, "img",
                                    lambda: evaluate_on_ray(["base"], model, None, variants, one_source,
                                                            RayWorkers(1, None, 256), progress=False))
    results = {}
    for count in (1, 2):
        label = f"Ray, {count} worker{'s' if count > 1 else ''}"
        seconds[label], results[count] = _timed(
            label + " (models built per actor)", images, "img",
            lambda count=count: evaluate_on_ray(["base"], model, None, variants, config,
                                                RayWorkers(count, None, 256), progress=False))
    print(f"  Ray 2 vs 1 worker: {seconds['Ray, 1 worker'] / seconds['Ray, 2 workers']:.2f}x   Ray 2 workers "
          f"vs in process ({threads} threads): {seconds['in process'] / seconds['Ray, 2 workers']:.2f}x")
    per_image = (seconds["Ray, 1 worker"] - seconds["start-up"]) / (images - n)
    fixed = seconds["start-up"] - n * per_image
    print(f"  a Ray worker's fixed cost (process, imports, model build, cold first batch): ~{fixed:.1f} s; "
          f"then {per_image:.2f} s/img (in process, 1 thread: {seconds['1 thread'] / images:.2f} s/img)")
    same = all(r.records.equals(one.records) for r in results.values())
    iou_diff = (full.records["iou"] - one.records["iou"]).abs().max()
    pred_diff = (full.records["predicted_iou"] - one.records["predicted_iou"]).abs().max()
    print(f"  Ray records identical to the 1-thread in-process run: {same}; {threads} threads vs 1: "
          f"max |IoU diff| {iou_diff:.2e}, max |predicted IoU diff| {pred_diff:.2e} points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corrupt-images", type=int, default=16)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the corrupt comparison")
    parser.add_argument("--part", choices=("both", "corrupt", "evaluate"), default="both")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does (the Ray actors call it themselves)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, load average {load} (other jobs skew these numbers)")
    start = time.perf_counter()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster
    connect(None, os.cpu_count() or 1, 256)
    print(f"local Ray cluster ({os.cpu_count()} CPUs) started in {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("both", "corrupt"):
            data = make_dataset(Path(tmp) / "data", args.corrupt_images, 512)
            bench_corrupt(data, Path(tmp), args.corrupt_images, args.repeats)
        if args.part in ("both", "evaluate"):
            few = make_dataset(Path(tmp) / "eval-sources", args.eval_images, 512)
            bench_evaluate(few, Path(tmp), args.backbone)


if __name__ == "__main__":
    main()

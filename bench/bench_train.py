"""Training throughput benchmark.

Part 1, Ray scaling (CPU): the real `gara train` launcher (TorchTrainer, DDP over gloo,
1 CPU per worker) with 1 vs 2 workers, same per-worker batch; samples/s of the last epoch
(training steps only, so start-up and warm-up are left out) and the scaling efficiency
sps(N) / (N x sps(1)). Data: artifacts/corrupted/train if present, else data/train.

Part 2, adapter training step (in-process, no Ray): the loop's own train step (batch
building, focal + dice + IoU loss, backward, clip, Adam) for LoRA r16, LoRA r256 and GaRA,
each in a fresh process: samples/s and peak memory (GPU: max allocated; CPU: peak RSS growth).

    python bench/bench_train.py                                  # CPU: both parts, vit_tiny
    python bench/bench_train.py --ray-backbones vit_tiny,lite_medsam --steps 3
    python bench/bench_train.py --device cuda --backbones vit_b --bf16 --ray-workers ""

Measure on an otherwise idle machine: 2 workers on 2 cores compete with anything else running.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lora_r16": {"kind": "lora", "rank": 16},
    "lora_r256": {"kind": "lora", "rank": 256},
    "gara": {"kind": "gara"},
}


# --- part 1: Ray scaling ------------------------------------------------------------------
def _base_checkpoint(backbone: str, folder: Path) -> str | None:
    """Seeded random weights saved to a file (backbones without packaged weights)."""
    import torch

    from gara.models.backbones import get_backbone_spec

    if get_backbone_spec(backbone).default_checkpoint is not None:
        return None
    from gara.models.backbones import build_backbone

    torch.manual_seed(0)
    path = folder / f"{backbone}.pth"
    torch.save(build_backbone(backbone, pretrained=False).model.state_dict(), path)
    return str(path)


def ray_scaling(backbones: list[str], workers: list[int], steps: int, batch: int, data: Path) -> list[dict]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from gara.config import parse_params
    from gara.train.launcher import train

    rows = []
    ray.init(address="local", num_cpus=max(2, *workers), include_dashboard=False,
             object_store_memory=128 * 2**20, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            tmp_path = Path(tmp)
            tracking = f"sqlite:///{tmp_path}/mlflow.db"
            for backbone in backbones:
                checkpoint = _base_checkpoint(backbone, tmp_path)
                for n in workers:
                    run = tmp_path / f"{backbone}-{n}"
                    params = parse_params({
                        "model": {"backbone": backbone, "checkpoint": checkpoint},
                        "train": {
                            "data": str(data), "val_data": str(data), "out": str(run / "adapter"),
                            "storage_path": str(run / "ray"), "num_workers": n, "batch_size": batch,
                            "epochs": 2, "max_steps_per_epoch": steps, "val_max_images": 1,
                            "log_every_n_steps": steps, "max_failures": 0,
                            "mlflow": {"tracking_uri": tracking, "experiment": "bench"},
                        },
                    })
                    t0 = time.perf_counter()
                    result = train(params)
                    rows.append({"backbone": backbone, "workers": n, "batch_per_worker": batch,
                                 "steps_per_epoch": steps, "samples_per_s": result.metrics["samples_per_s"],
                                 "wall_s": time.perf_counter() - t0})
    finally:
        ray.shutdown()
    return rows


def print_scaling(rows: list[dict]) -> None:
    print(f"\nRay Train scaling (CPU, gloo, 1 CPU/worker; load average {os.getloadavg()[0]:.1f})")
    print(f"{'backbone':<12} {'workers':>7} {'batch/w':>7} {'samples/s':>10} {'efficiency':>10} "
          f"{'wall s':>7}")
    for row in rows:
        one = next(r for r in rows if r["backbone"] == row["backbone"] and r["workers"] == 1)
        eff = row["samples_per_s"] / (row["workers"] * one["samples_per_s"])
        print(f"{row['backbone']:<12} {row['workers']:>7} {row['batch_per_worker']:>7} "
              f"{row['samples_per_s']:>10.2f} {eff:>10.2f} {row['wall_s']:>7.1f}")


# --- part 2: adapter training step --------------------------------------------------------
def _synthetic_samples(n: int, size: int, seed: int = 0) -> list[dict]:
    """Images of size x 3/4 size with 4 rectangle instances each (the step's cost, not its data)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = size * 3 // 4, size
    samples = []
    for i in range(n):
        masks = np.zeros((4, h, w), bool)
        for k in range(4):
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            masks[k, y0 : y0 + h // 3, x0 : x0 + w // 3] = True
        samples.append({
            "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "masks": masks,
            "boxes": np.zeros((4, 4), np.float32), "category_ids": np.ones(4, np.int64),
            "ann_ids": np.arange(4, dtype=np.int64) + 4 * i, "iscrowd": np.zeros(4, bool),
            "image_id": i, "file_name": f"{i}.png", "meta": {},
        })
    return samples


def _measure_step(backbone: str, variant: str, args: dict, queue) -> None:
    import torch

    from gara.config import ModelConfig, PromptConfig, TrainConfig
    from gara.models.adapters.config import AdapterConfig
    from gara.models.factory import build_segmenter
    from gara.train.batches import build_batch
    from gara.train.loop import autocast_for, train_step
    from gara.train.losses import loss_weights

    torch.manual_seed(0)
    device = torch.device(args["device"])
    config = ModelConfig(backbone=backbone, adapter=AdapterConfig(**VARIANTS[variant]))
    seg = build_segmenter(config, pretrained=backbone == "lite_medsam").to(device)
    train = TrainConfig(mixed_precision="bf16" if args["bf16"] else "no")
    samples = _synthetic_samples(args["batch"], seg.transform.size)
    params = [p for p in seg.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    autocast = autocast_for(device, train)
    seg.train()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> None:
        batch = build_batch(seg, samples, PromptConfig(), seed=0, epoch=i)
        train_step(seg, seg, batch, optimizer, loss_weights(train), train.grad_clip, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args["warmup"]):
        step(i)
    times = []
    for i in range(args["repeats"]):
        t0 = time.perf_counter()
        step(args["warmup"] + i)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    result = {"backbone": backbone, "variant": variant, "step_s": median,
              "samples_per_s": args["batch"] / median,
              "trainable_params": sum(p.numel() for p in params)}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    queue.put(result)


def adapter_steps(args: dict) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for backbone in [b for b in args["backbones"].split(",") if b]:
        for variant in VARIANTS:
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure_step, args=(backbone, variant, args, queue))
            proc.start()
            rows.append(queue.get())
            proc.join()
    return rows


def print_steps(rows: list[dict], args: dict) -> None:
    memory = "GPU max allocated" if args["device"].startswith("cuda") else "peak RSS growth"
    print(f"\nAdapter training step (device={args['device']} batch={args['batch']} bf16={args['bf16']}; "
          f"memory = {memory})")
    print(f"{'backbone':<12} {'variant':<10} {'trainable':>11} {'step s':>8} {'samples/s':>10} "
          f"{'x r256':>7} {'peak MiB':>9}")
    for row in rows:
        r256 = next(r for r in rows if r["backbone"] == row["backbone"] and r["variant"] == "lora_r256")
        print(f"{row['backbone']:<12} {row['variant']:<10} {row['trainable_params']:>11,} "
              f"{row['step_s']:>8.3f} "
              f"{row['samples_per_s']:>10.2f} {row['samples_per_s'] / r256['samples_per_s']:>7.2f} "
              f"{row['peak_mib']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbones", default="vit_tiny", help="part 2 backbones ('' to skip)")
    parser.add_argument("--batch", type=int, default=4, help="part 2 images per step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="part 2: bf16 autocast (GPU)")
    parser.add_argument("--ray-workers", default="1,2", help="part 1 worker counts ('' to skip)")
    parser.add_argument("--ray-backbones", default="vit_tiny")
    parser.add_argument("--ray-batch", type=int, default=4, help="part 1 images per worker per step")
    parser.add_argument("--steps", type=int, default=8, help="part 1 steps per epoch (2 epochs)")
    parser.add_argument("--data", default=None,
                        help="part 1 dataset (default: corrupted train, else data/train)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = vars(parser.parse_args())
    results: dict[str, list[dict]] = {}
    workers = [int(w) for w in args["ray_workers"].split(",") if w.strip()]
    if workers:
        if 1 not in workers:
            workers.insert(0, 1)  # the baseline for the efficiency
        candidates = (REPO / "artifacts/corrupted/train", REPO / "data/train")
        data = Path(args["data"]) if args["data"] else next(
            p for p in candidates if (p / "annotations.json").is_file()
        )
        results["ray_scaling"] = ray_scaling(args["ray_backbones"].split(","), workers, args["steps"],
                                             args["ray_batch"], data)
        print_scaling(results["ray_scaling"])
    if args["backbones"]:
        results["adapter_step"] = adapter_steps(args)
        print_steps(results["adapter_step"], args)
    if args["json"]:
        Path(args["json"]).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

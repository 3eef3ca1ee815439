"""What gara.allocator.keep_freed_memory buys: a LiteMedSAM encoder forward with glibc's
default malloc vs with large freed blocks kept in the process.

Each setting runs in its own fresh process (mallopt is process-wide): the median wall time of
a batch of bf16 (where native) encoder forwards, the process's user and system CPU time
(page faults show up as system time), and a sha256 of the output, which must be the same.

    python bench/bench_allocator.py                  # LiteMedSAM, batch 4
    python bench/bench_allocator.py --backbone vit_tiny --batch 8

Measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import statistics
import time


def _measure(keep: bool, backbone: str, batch: int, repeats: int, queue) -> None:
    import torch

    from gara import precision
    from gara.allocator import keep_freed_memory
    from gara.config import ModelConfig
    from gara.models.factory import build_segmenter

    applied = keep_freed_memory() if keep else False
    torch.manual_seed(0)
    seg = build_segmenter(ModelConfig(backbone=backbone), with_adapter=False,
                          pretrained=backbone == "lite_medsam").eval()
    size = seg.transform.size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad(), precision.autocast(torch.device("cpu"), "bf16"):
        out = seg.encode(x)  # warm-up
        start = os.times()
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = seg.encode(x)
            times.append(time.perf_counter() - t0)
        end = os.times()
    digest = hashlib.sha256(out.float().contiguous().numpy().tobytes()).hexdigest()[:16]
    queue.put({"keep": keep, "applied": applied, "median_s": statistics.median(times),
               "user_s": (end.user - start.user) / repeats, "sys_s": (end.system - start.system) / repeats,
               "output_sha256": digest})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for keep in (False, True):
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(keep, args.backbone, args.batch, args.repeats, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    print(f"{args.backbone} encoder forward, batch {args.batch}, median of {args.repeats} (per forward)")
    print(f"{'malloc':<22} {'wall s':>8} {'user s':>8} {'sys s':>8}  output sha256")
    for row in rows:
        label = "keeps freed blocks" if row["keep"] else "glibc default"
        if row["keep"] and not row["applied"]:
            label += " (not applied)"
        timings = f"{row['median_s']:8.3f} {row['user_s']:8.3f} {row['sys_s']:8.3f}"
        print(f"{label:<22} {timings}  {row['output_sha256']}")
    default, kept = rows
    same = "identical" if default["output_sha256"] == kept["output_sha256"] else "DIFFERENT"
    print(f"speed-up {default['median_s'] / kept['median_s']:.2f}x; outputs {same}")


if __name__ == "__main__":
    main()

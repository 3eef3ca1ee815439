"""Adapter cost benchmark: frozen vs LoRA r16 vs LoRA r256 vs GaRA (+ Adaptformer and COBOT variants).

Prints, per backbone, the evaluation forward time (ratio to frozen) and the training step
time (forward + backward + Adam step; ratio to LoRA r256, and images per second), with peak
memory. Each variant runs in a fresh process so peak memory is its own. Ratios are what to
compare: measure on an otherwise idle machine, all variants in one run.

    python bench/bench_adapters.py                       # CPU: vit_tiny and lite_medsam
    python bench/bench_adapters.py --device cuda --backbones vit_b --batch 4 --bf16
    python bench/bench_adapters.py --device cuda --backbones sam2.1_hiera_b+ --batch 4 --bf16

Goals (issue 2): GaRA evaluation forward within 1.10x of frozen; GaRA training step within
1.3x of LoRA r256.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

VARIANTS = {
    "frozen": None,
    "lora_r16": {"kind": "lora", "rank": 16},
    "lora_r256": {"kind": "lora", "rank": 256},
    "gara": {"kind": "gara"},
    "adaptformer": {"kind": "adaptformer"},
    "lora_r16_cobot": {"kind": "lora", "rank": 16, "cobot": True},
    "gara_cobot": {"kind": "gara", "cobot": True},
}


def _measure(backbone: str, variant: str, args: dict, queue) -> None:
    import numpy as np
    import torch

    from gara.config import ModelConfig
    from gara.models.adapters.config import AdapterConfig
    from gara.models.adapters.gara import effective_ranks
    from gara.models.factory import build_segmenter
    from gara.models.segmenter import Prompts

    torch.manual_seed(0)
    device = torch.device(args["device"])
    adapter = VARIANTS[variant]
    config = ModelConfig(backbone=backbone, adapter=AdapterConfig(**(adapter or {})))
    seg = build_segmenter(config, with_adapter=adapter is not None, pretrained=backbone == "lite_medsam")
    seg.to(device)
    size = seg.transform.size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args["batch"])]
    batch, metas = seg.preprocess(images)
    box = Prompts(boxes=torch.tensor([[size * 0.2, size * 0.2, size * 0.7, size * 0.8]]))
    prompts = [seg.prompts_to_input(box, m) for m in metas]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["bf16"])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(step, repeats):
        for _ in range(args["warmup"]):
            step()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    result = {"backbone": backbone, "variant": variant}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    seg.eval()

    def eval_step():
        with torch.no_grad(), amp:
            seg(batch, prompts)

    result["eval_s"] = timed(eval_step, args["repeats"])
    if adapter and adapter["kind"] == "gara":
        ranks = effective_ranks(seg, len(images))
        result["mean_effective_rank"] = float(torch.stack(list(ranks.values())).mean())
    if device.type == "cuda":
        result["eval_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    if adapter is not None:
        params = [p for p in seg.parameters() if p.requires_grad]
        optim = torch.optim.Adam(params, lr=1e-4)
        target = torch.zeros(1, 1, 1, 1, device=device)
        seg.train()

        def train_step():
            optim.zero_grad(set_to_none=True)
            with amp:
                out = seg(batch, prompts)
                loss = sum(
                    torch.nn.functional.binary_cross_entropy_with_logits(lr.float(), target.expand_as(lr))
                    for lr in out.low_res_logits
                )
            loss.backward()
            optim.step()

        result["train_s"] = timed(train_step, max(2, args["repeats"] // 2))
        if device.type == "cuda":
            result["train_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    # CPU: growth of the process's peak RSS over what the built model already used.
    result["peak_rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", default="vit_tiny,lite_medsam")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = vars(parser.parse_args())
    ctx = mp.get_context("spawn")
    results = []
    for backbone in args["backbones"].split(","):
        rows = {}
        for variant in VARIANTS:
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(backbone, variant, args, queue))
            proc.start()
            rows[variant] = queue.get()
            proc.join()
        results.extend(rows.values())
        frozen, r256 = rows["frozen"], rows["lora_r256"]
        print(f"\n{backbone}  device={args['device']} batch={args['batch']} bf16={args['bf16']}")
        header = ("variant", "eval s", "x frozen", "train s", "x r256", "train img/s", "peak MiB")
        print("{:<14} {:>8} {:>9} {:>8} {:>7} {:>11} {:>9}  note".format(*header))
        for name, row in rows.items():
            train = row.get("train_s")
            peak = row.get("train_peak_mib", row.get("eval_peak_mib", row["peak_rss_growth_mib"]))
            rank = row.get("mean_effective_rank")
            note = f"mean effective rank {rank:.1f}" if rank is not None else ""
            train_s = f"{train:8.4f}" if train else "       -"
            train_x = f"{train / r256['train_s']:7.3f}" if train else "      -"
            rate = f"{args['batch'] / train:11.2f}" if train else "          -"
            eval_x = row["eval_s"] / frozen["eval_s"]
            timings = f"{row['eval_s']:8.4f} {eval_x:9.3f} {train_s} {train_x} {rate}"
            print(f"{name:<14} {timings} {peak:9.1f}  {note}")
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

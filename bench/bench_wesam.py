"""WeSAM's behaviour on the embedded default, over image orders: does the anchor keep
self-training from collapsing, and does full WeSAM beat the frozen base?

Real LiteMedSAM weights, the pipeline's own corruption of embedded images (params.yaml's
``corrupt`` section), the paper's LoRA (r4 on q, v), one image per step through the per-step
method the Ray loop calls, with its bf16 autocast. For each image order: full WeSAM and
self-training alone trained side by side (two processes, one core each, as Ray workers), then
one box-prompt evaluation of both and the frozen base on the same corrupted val images.
Printed per order and as mean / sd / min..max over orders: val box IoU (every image) and
Degrade box IoU. These are research claims with a spread, so they live here, not in CI.

    python bench/bench_wesam.py                 # orders 0, 1, 2 (~4.5 min each on 2 idle cores)
    python bench/bench_wesam.py --orders 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gara import precision
from gara.allocator import keep_freed_memory
from gara.config import EvaluateConfig, ModelConfig, PromptConfig, TrainConfig, load_params
from gara.data.coco import read_coco, write_coco
from gara.data.corrupt import corrupt_dataset
from gara.evaluate.metrics import mean_over_images
from gara.evaluate.report import summarize_model
from gara.evaluate.runner import evaluate_models
from gara.models.adapter_io import load_adapted_segmenter, save_adapter
from gara.models.adapters.config import AdapterConfig
from gara.models.factory import build_segmenter
from gara.train.wesam import WeSAM

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
PAPER_LORA = AdapterConfig(kind="lora", rank=4, projections=["q", "v"])  # WeSAM's trainable part

# WeSAM from the paper's LoRA, one image per step, at lr 1e-2 (100x the paper's 1e-4, so that 24
# CPU steps show what its thousands of steps do); the same init, images and seeds for every run.
TRAIN_SOURCES = 32  # embedded train images, each as its clean copy + 2 corrupted variants
STEPS, LR, MAX_INSTANCES = 24, 1e-2, 4
VAL_SOURCES, VAL_SEVERITY = 3, 5  # embedded val images, each clean + VAL_TYPES at severity 5
VAL_TYPES = ["fog", "gaussian_noise", "motion_blur", "jpeg", "contrast", "night"]
FULL = {}  # train.wesam defaults: every term on
SELF_ALONE = {"anchor": 0, "contrastive": 0}


def subset(src: Path, dst: Path, image_ids: list[int]) -> Path:
    """A dataset folder holding ``image_ids`` of ``src`` (same file names, so the same corruption)."""
    coco = read_coco(src)
    keep = set(image_ids)
    images = [e for e in coco["images"] if e["id"] in keep]
    for entry in images:
        (dst / entry["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / entry["file_name"], dst / entry["file_name"])
    anns = [a for a in coco["annotations"] if a["image_id"] in keep]
    write_coco(dst, {**coco, "images": images, "annotations": anns})
    return dst


def corrupt_embedded(root: Path) -> dict[str, Path]:
    """The embedded sample's first TRAIN_SOURCES train and VAL_SOURCES val images, corrupted by
    the pipeline's own code: train as params.yaml says, val clean + VAL_TYPES at VAL_SEVERITY."""
    cfg = load_params(REPO / "params.yaml").corrupt
    train_ids = sorted(e["id"] for e in read_coco(DATA / "train")["images"])[:TRAIN_SOURCES]
    val_ids = sorted(e["id"] for e in read_coco(DATA / "val")["images"])[:VAL_SOURCES]
    corrupt_dataset(subset(DATA / "train", root / "src-train", train_ids), root / "train", cfg.types,
                    cfg.severities, cfg.seed, cfg.train_variants_per_image, workers=1, progress=False)
    corrupt_dataset(subset(DATA / "val", root / "src-val", val_ids), root / "val", VAL_TYPES,
                    [VAL_SEVERITY], cfg.seed, None, workers=1, progress=False)
    return {"train": root / "train", "val": root / "val"}


def wesam_train(segmenter, data: Path, steps: int, lr: float, order_seed: int = 0,
                **wesam) -> list[dict[str, float]]:
    """``steps`` WeSAM steps of one image each, through the method object the Ray loop uses;
    images in the order ``order_seed`` draws."""
    train = TrainConfig(method="wesam", data=str(data), lr=lr, batch_size=1,
                        prompts=PromptConfig(max_instances=MAX_INSTANCES), wesam=wesam)
    method = WeSAM(train, segmenter)
    order = np.random.default_rng(order_seed).permutation(len(method.dataset))
    params = [p for p in segmenter.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    autocast = precision.autocast("cpu", train.mixed_precision)
    autocast = autocast if isinstance(autocast, torch.autocast) else None
    segmenter.train()
    torch.manual_seed(0)
    history = []
    for step in range(steps):
        batch = method.batch([method.dataset[int(order[step % len(order)])]], epoch=0)
        loss, metrics, _ = method.step(method.module, batch, optimizer, autocast, None, step)
        history.append({"loss": loss, **metrics})
    segmenter.eval()
    return history


def train_paper_lora(data: Path, out: Path, wesam: dict, order_seed: int) -> list[dict[str, float]]:
    """One behavioural run in its own process: the paper's LoRA on LiteMedSAM (seeded init),
    STEPS WeSAM steps on one thread (as a Ray worker), the adapter saved to ``out``."""
    keep_freed_memory()  # as a Ray worker does (a spawned process starts with malloc's defaults)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    segmenter = build_segmenter(ModelConfig(adapter=PAPER_LORA))
    history = wesam_train(segmenter, data, STEPS, LR, order_seed, **wesam)
    save_adapter(segmenter, out)
    return history


def evaluate(models: dict, data: Path) -> dict:
    """Box-prompt evaluation (gara.evaluate): per model its Clear/Degrade summary and its
    validation IoU, the evaluation's metric over every image, clean and corrupted."""
    config = EvaluateConfig(prompts=PromptConfig(kinds=["box"]), overlay_images=0)
    result = evaluate_models(models, data, config, progress=False)
    records = result.records
    out = {}
    for name in result.models:
        mine = records[records["model"] == name]
        out[name] = {"summary": summarize_model(records, name)["summary"], "images": len(result.images),
                     "val_iou": float(mean_over_images(mine, ["iou"])["iou"].iloc[0])}
    return out



def run_order(data: dict[str, Path], out: Path, order_seed: int) -> dict:
    """Full WeSAM and self-training alone in one image order, scored beside the frozen base."""
    configs = {"full": FULL, "self": SELF_ALONE}
    with ProcessPoolExecutor(len(configs), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {name: pool.submit(train_paper_lora, data["train"], out / name, wesam, order_seed)
                for name, wesam in configs.items()}
        for job in jobs.values():
            job.result()
    models = {"base": build_segmenter(ModelConfig(), with_adapter=False),
              **{name: load_adapted_segmenter(out / name) for name in configs}}
    return evaluate(models, data["val"])


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} sd {sd:5.2f} [{min(values):.2f}..{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", default="0,1,2", help="image-order seeds")
    args = parser.parse_args()
    orders = [int(v) for v in args.orders.split(",")]
    if not (DATA / "train" / "annotations.json").is_file():
        sys.exit("the embedded sample is not here: run `dvc pull data.dvc`")
    rows = {name: {"val": [], "degrade": []} for name in ("base", "full", "self")}
    with tempfile.TemporaryDirectory(prefix="bench-wesam-") as tmp:
        data = corrupt_embedded(Path(tmp) / "data")
        print(f"{STEPS} steps at lr {LR}; val box IoU (all images) / Degrade box IoU")
        for order in orders:
            scores = run_order(data, Path(tmp) / f"order-{order}", order)
            line = []
            for name, row in rows.items():
                row["val"].append(scores[name]["val_iou"])
                row["degrade"].append(scores[name]["summary"]["degrade"]["box"]["iou"])
                line.append(f"{name} {row['val'][-1]:.2f} / {row['degrade'][-1]:.2f}")
            print(f"order {order}: " + ", ".join(line), flush=True)
    print(f"over {len(orders)} orders (mean, sd, min..max):")
    for name, row in rows.items():
        print(f"  {name:5s} val {_spread(row['val'])}   degrade {_spread(row['degrade'])}")
    alone_below = sum(s < b for s, b in zip(rows["self"]["val"], rows["base"]["val"], strict=True))
    full_above = sum(f > b for f, b in zip(rows["full"]["degrade"], rows["base"]["degrade"], strict=True))
    anchored = sum(s < f for s, f in zip(rows["self"]["val"], rows["full"]["val"], strict=True))
    print(f"self-training alone below the base: {alone_below}/{len(orders)} orders; below full WeSAM: "
          f"{anchored}/{len(orders)}; full WeSAM above the base on Degrade: {full_above}/{len(orders)}")


if __name__ == "__main__":
    main()

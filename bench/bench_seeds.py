"""Training seeds: how much of each row's gain over the frozen base is the method, how much luck.

For every row and seed: `gara train` with the pipeline's own params (the default budget:
`params.yaml`, Ray, 2 CPU workers) and `--set train.seed=S` (adapter init, data order,
Gumbel noise and prompts all follow it); then ONE evaluation of the frozen base and every
adapter on the pipeline's evaluation set (`evaluate.data`: run `dvc repro corrupt` first),
so all rows are paired on the same images and prompts. Printed per row and seed: the paired
difference to the base (box IoU, Degrade and Clear) with its 95% interval over source
images; per row: the mean over seeds, the spread across seeds (sd, min..max) and how many
seeds give a measurable gain (ci_low > 0); per seed: each row against the --reference row
(LoRA r16 unless told).

Rows are the train stages of dvc.yaml and pipelines/comparison/dvc.yaml (their --set lines,
so the bench trains exactly what the pipelines train), plus variants given as
`--variant NAME="ROW --set key=value ..."` (a row's sets with more on top).

    python bench/bench_seeds.py               # rows gara, lora, gara_cobot, lora_cobot; seeds 0, 1, 2
    python bench/bench_seeds.py --rows gara,lora --seeds 0,1,2,3,4
    python bench/bench_seeds.py --variant gara_bias3="gara --set model.adapter.gate_bias=3"
    python bench/bench_seeds.py --rows gara,gara_distill --reference gara   # label-free vs supervised

Trained adapters are kept under --out and reused on a re-run (delete a folder to retrain it).
On 2 idle cores: ~2 min per training, ~0.4 s per image per extra model in the evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINES = (REPO / "dvc.yaml", REPO / "pipelines" / "comparison" / "dvc.yaml")


def pipeline_rows() -> dict[str, list[str]]:
    """Row name -> the `gara train` --set arguments of its train stage, from the dvc.yaml files."""
    rows: dict[str, list[str]] = {}
    for path in PIPELINES:
        stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})
        for name, item in (stages.get("train", {}).get("foreach") or {}).items():
            data = ["--set", f"train.data={item['data']}"] if "data" in item else []  # as the stage's cmd
            rows[name] = data + shlex.split(" ".join(str(item.get("sets", "")).split()))
    return rows


def train(name: str, sets: list[str], seed: int, out: Path) -> Path:
    folder = out / "adapters" / f"{name}-s{seed}"
    made_with = folder / "bench_sets.json"  # what the folder was trained with: reuse only the same
    reusable = (folder / "adapter.json").is_file() and made_with.is_file()
    if reusable and json.loads(made_with.read_text(encoding="utf-8")) == sets:
        print(f"{name} seed {seed}: reusing {folder}", flush=True)
        return folder
    cmd = [sys.executable, "-m", "gara.cli", "train", "--params", "params.yaml", *sets,
           "--set", f"train.seed={seed}", "--set", f"train.mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
           "--set", "train.mlflow.experiment=bench-seeds", "--set", f"train.storage_path={out / 'ray'}",
           "--out", str(folder)]
    start = time.perf_counter()
    log = out / "logs" / f"{name}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        proc = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed {seed}: gara train failed ({proc.returncode}); see {log}")
    made_with.write_text(json.dumps(sets), encoding="utf-8")
    print(f"{name} seed {seed}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def summarise(records: pd.DataFrame, names: dict[str, tuple[str, int]], bootstrap, reference: str
              ) -> pd.DataFrame:
    from gara.evaluate.paired import SourceBootstrap

    boot = SourceBootstrap(records, bootstrap)
    rows = []
    for model, (row, seed) in names.items():
        entry: dict = {"row": row, "seed": seed}
        other_row = f"{reference}-s{seed}"
        comparisons = [("degrade", "base", "degrade"), ("clear", "base", "clear")]
        if other_row in names and other_row != model:
            comparisons.append(("vs_reference", other_row, "degrade"))
        for key, other, part in comparisons:
            diff = boot.difference(model, other, part, "box", "iou")
            entry.update({key: diff.delta, f"{key}_low": diff.ci_low, f"{key}_high": diff.ci_high})
            entry.setdefault("n_sources", diff.n_sources)
        rows.append(entry)
    return pd.DataFrame(rows)


def report(table: pd.DataFrame, max_clear_drop: float, reference: str) -> str:
    def cell(r, key: str) -> str:
        if pd.isna(r.get(key)):
            return "-"
        return f"{r[key]:+.2f} [{r[key + '_low']:+.2f}, {r[key + '_high']:+.2f}]"

    lines = ["| row | seed | Degrade box IoU - base | Clear box IoU - base | "
             f"Degrade - {reference} (same seed) |", "|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['row']} | {r['seed']} | {cell(r, 'degrade')} | {cell(r, 'clear')} | "
                     f"{cell(r, 'vs_reference')} |")
    lines += ["", "| row | seeds | Degrade - base: mean (sd) [min, max] | measurable (ci_low > 0) | "
                  f"Clear - base: mean (sd) [min, max] | Clear ci_low > -{max_clear_drop:g} |",
              "|---|---|---|---|---|---|"]
    for row, group in table.groupby("row", sort=False):
        def spread(key: str, group=group) -> str:
            v = group[key]
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            return f"{v.mean():+.2f} ({sd:.2f}) [{v.min():+.2f}, {v.max():+.2f}]"

        lines.append(f"| {row} | {len(group)} | {spread('degrade')} | {(group['degrade_low'] > 0).sum()}/"
                     f"{len(group)} | {spread('clear')} | {(group['clear_low'] > -max_clear_drop).sum()}/"
                     f"{len(group)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="gara,lora,gara_cobot,lora_cobot")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--reference", default="lora",
                        help="the row every other row is paired with, seed by seed")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="ROW --set k=v ..."')
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "seeds")
    args = parser.parse_args()

    from gara.allocator import keep_freed_memory
    from gara.config import load_params
    from gara.evaluate.report import write_report
    from gara.evaluate.runner import evaluate_models, resolve_models

    keep_freed_memory()
    known = pipeline_rows()
    plan: dict[str, list[str]] = {}
    for name in [r for r in args.rows.split(",") if r]:
        if name not in known:
            raise SystemExit(f"--rows: {name!r} is not a train row of the pipelines ({', '.join(known)})")
        plan[name] = known[name]
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        base_row, *extra = shlex.split(rest)
        if base_row not in known or not name:
            raise SystemExit(f"--variant {spec!r}: expected NAME=\"ROW --set ...\", "
                             f"ROW one of {', '.join(known)}")
        plan[name] = known[base_row] + extra
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    params = load_params("params.yaml")
    if "box" not in params.evaluate.prompts.kinds:
        raise SystemExit("bench_seeds compares box IoU: evaluate.prompts.kinds must include box")

    adapters = {}
    for name, sets in plan.items():
        for seed in seeds:
            adapters[f"{name}-s{seed}"] = (name, seed, train(name, sets, seed, out))
    specs = ["base"] + [f"{model}={folder}" for model, (_, _, folder) in adapters.items()]
    start = time.perf_counter()
    models = resolve_models(specs, params.model)
    result = evaluate_models(models, params.evaluate.data, params.evaluate, progress=True)
    write_report(result, out / "eval", params.evaluate.bootstrap)
    seconds = time.perf_counter() - start
    print(f"evaluated {len(models)} models on {len(result.images)} images in {seconds:.0f} s")

    names = {model: (row, seed) for model, (row, seed, _) in adapters.items()}
    table = summarise(result.records, names, params.evaluate.bootstrap, args.reference)
    table.to_csv(out / "seeds.csv", index=False)
    text = report(table, params.registry.gate.max_clear_drop, args.reference)
    (out / "seeds.md").write_text(text + "\n", encoding="utf-8")
    n = result.records["source_image_id"].nunique()
    print(f"\nPaired box IoU differences, 95% intervals over {n} source images "
          f"({params.evaluate.bootstrap.resamples} resamples); {out / 'seeds.md'}\n")
    print(text)


if __name__ == "__main__":
    main()

"""Prefect 3 flow ``retrain``: the DVC pipeline's stages as retried, cached tasks.

    pull_data -> corrupt_split (train, val) -> train_adapter -> evaluate_adapter
              -> register_version -> promote_version -> markdown artifact

Orchestration only: every task calls the same ``gara`` function as the matching DVC stage
(``corrupt_dataset``, ``launcher.train``, ``evaluate_to_report``, ``register``, ``promote``).

- Retries with exponential backoff where a transient fault is plausible: the DVC pull (S3),
  Ray submission / training, and registration (artifact uploads to S3).
- Caching where inputs are unchanged: corruption, training and evaluation are keyed on the
  DVC data hash, the params they read, the code commit and the presence of their output, so
  a re-run after a failed upload only redoes what failed (results persist in Prefect's
  result storage, ``PREFECT_LOCAL_STORAGE_PATH``).
- A run that fails for good never reaches ``promote``: the registry keeps its champion.

Run it directly (``python pipelines/retrain.py --help``) or through the deployment in
``prefect.yaml`` / ``pipelines/serve.py`` (cron schedule).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff

PROMOTION_LIMIT = "gara-promote"  # global concurrency limit: one promotion at a time, cluster-wide
SPLITS = ("train", "val")  # data/<split> as tracked by data.dvc


@contextlib.contextmanager
def working_directory(path: str | Path) -> Iterator[Path]:
    """Run the stages from the project checkout (relative params paths resolve there)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield Path(path).resolve()
    finally:
        os.chdir(previous)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@functools.cache
def _code_version() -> str:
    """The gara code's commit: part of every cache key (new code reruns the stages)."""
    from gara.train.lineage import git_commit, project_root

    return git_commit(project_root())


def _cache_unless_missing(output_arg: str):
    """Cache key = the task's inputs + whether its output still exists (a deleted output reruns)."""

    def key_fn(context, arguments: dict[str, Any]) -> str:
        output = Path(arguments[output_arg])
        return _key(context.task.name, arguments, output.exists(), _code_version())

    return key_fn


# --- tasks ---------------------------------------------------------------------------------


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.2)
def pull_data(data_rev: str | None) -> str:
    """Check out data.dvc at ``data_rev`` (None: as committed) and ``dvc pull`` it; returns its hash."""
    import yaml

    if data_rev:
        subprocess.run(["git", "checkout", data_rev, "--", "data.dvc"], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "dvc", "pull", "data.dvc"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc pull data.dvc failed ({proc.returncode}): {proc.stderr[-2000:]}")
    outs = (yaml.safe_load(Path("data.dvc").read_text(encoding="utf-8")) or {}).get("outs") or [{}]
    return str(outs[0].get("md5") or outs[0].get("hash") or "unknown")


@task(cache_key_fn=_cache_unless_missing("out"), persist_result=True)
def corrupt_split(
    source: str, out: str, corrupt: dict[str, Any], variants: int | None, balanced: bool, data_hash: str
) -> str:
    from gara.data.corrupt import corrupt_dataset

    summary = corrupt_dataset(source, out, types=corrupt["types"], severities=corrupt["severities"],
                              seed=corrupt["seed"], variants_per_image=variants, progress=False,
                              balanced=balanced)
    get_run_logger().info("%s: %d images, %d written, %d skipped", out, summary.images, summary.written,
                          summary.skipped)
    return out


@task(cache_key_fn=_cache_unless_missing("out"), persist_result=True, retries=1,
      retry_delay_seconds=exponential_backoff(backoff_factor=15))
def train_adapter(params: dict[str, Any], out: str, data_hash: str) -> dict[str, Any]:
    from gara.config import parse_params
    from gara.train.launcher import train

    result = train(parse_params(params, "retrain flow"))
    return {"adapter_dir": str(result.adapter_dir), "run_id": result.run_id, "metrics": result.metrics}


@task(cache_key_fn=_cache_unless_missing("out"), persist_result=True)
def evaluate_adapter(params: dict[str, Any], specs: list[str], out: str, weights: str) -> dict[str, Any]:
    from gara.config import parse_params
    from gara.evaluate.report import evaluate_to_report

    metrics, _ = evaluate_to_report(parse_params(params, "retrain flow"), specs, progress=False)
    return metrics


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.2)
def register_version(
    params: dict[str, Any], adapter_dir: str, report_dir: str, candidate: str
) -> dict[str, Any]:
    from dataclasses import asdict

    from gara.config import parse_params
    from gara.registry.register import register

    return asdict(register(parse_params(params, "retrain flow"), adapter_dir, report_dir, candidate))


@task
def promote_version(params: dict[str, Any], version: str) -> dict[str, Any]:
    from dataclasses import asdict

    from gara.config import parse_params
    from gara.registry.promote import evaluation_rescorer, promote

    loaded = parse_params(params, "retrain flow")
    # strict=False: without the limit defined on the server this still runs (the registry's
    # own lock serialises promotions from one host; define the limit for a cluster).
    with concurrency(PROMOTION_LIMIT, occupy=1, strict=False):
        return asdict(promote(loaded, version, evaluation_rescorer(loaded)))


# --- the flow ------------------------------------------------------------------------------


def summary_markdown(metrics: dict[str, Any], candidate: str, decision: dict[str, Any],
                     registered: dict[str, Any]) -> str:
    rows = ["| model | Clear box IoU | Degrade box IoU | Clear point IoU | Degrade point IoU |",
            "|---|---|---|---|---|"]
    for name, model in metrics["models"].items():
        s = model["summary"]

        def cell(split: str, kind: str, s=s) -> str:
            value = (s.get(split) or {}).get(kind, {}).get("iou")
            return "-" if value is None else f"{value:.1f}"

        rows.append(f"| {name}{' (candidate)' if name == candidate else ''} | {cell('clear', 'box')} | "
                    f"{cell('degrade', 'box')} | {cell('clear', 'point')} | {cell('degrade', 'point')} |")
    verdict = "**promoted to champion**" if decision["promoted"] else "**not promoted**"
    return "\n".join([
        f"# Retrain: {registered['name']} version {registered['version']}", "",
        f"Evaluation set `{metrics['evaluation_set']}`, {metrics['images']['evaluated']} images.", "",
        *rows, "",
        f"Promotion: {verdict} (compared with {decision['compared_with']}): {decision['reason']}.",
        f"Champion is now version {decision['champion']}.",
    ])


@flow(name="retrain", log_prints=True)
def retrain(
    workdir: str = ".",
    data_rev: str | None = None,
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Pull the DVC data revision, corrupt, train (Ray), evaluate, register and promote.

    workdir: the project checkout to run in. data_rev: git revision of data.dvc (None: as
    checked out). overrides: dotted params, as ``gara train --set``. ray_address: an existing
    Ray cluster (None: a local one). experiment: MLflow experiment (default train.mlflow).
    """
    from gara.config import load_params
    from gara.models.adapter_io import read_manifest

    logger = get_run_logger()
    with working_directory(workdir):
        extra = dict(overrides or {})
        if ray_address:
            extra["train.ray_address"] = ray_address
        if experiment:
            extra["train.mlflow.experiment"] = experiment
        params = load_params(params_file, extra)
        kind = params.model.adapter.kind
        candidate = params.registry.candidate or kind
        params.train.out = f"artifacts/adapters/{kind}"
        params.evaluate.out = f"reports/retrain/{candidate}"
        as_dict = params.model_dump(mode="json")

        data_hash = pull_data(data_rev)
        logger.info("data.dvc at %s: %s", data_rev or "the checked-out revision", data_hash)
        corrupt = params.corrupt.model_dump(mode="json")
        # As the corrupt stage: train variants drawn per image, val variants dealt out evenly.
        train_variants, val_variants = (params.corrupt.train_variants_per_image,
                                        params.corrupt.val_variants_per_image)
        corrupt_split(f"data/{SPLITS[0]}", params.train.data, corrupt, train_variants, False, data_hash)
        corrupt_split(f"data/{SPLITS[1]}", params.train.val_data, corrupt, val_variants,
                      val_variants is not None, data_hash)

        trained = train_adapter(as_dict, params.train.out, data_hash)
        weights = read_manifest(trained["adapter_dir"]).weights_sha256
        specs = [params.registry.base_row, f"{candidate}={trained['adapter_dir']}"]
        metrics = evaluate_adapter(as_dict, specs, params.evaluate.out, weights)

        registered = register_version(as_dict, trained["adapter_dir"], params.evaluate.out, candidate)
        decision = promote_version(as_dict, registered["version"])
        create_markdown_artifact(
            markdown=summary_markdown(metrics, candidate, decision, registered), key="retrain-report",
            description=f"{registered['name']} v{registered['version']}: evaluation and promotion")
    return {"registered": registered, "decision": decision, "data_hash": data_hash}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the retrain flow once, in this process.")
    parser.add_argument("--workdir", default=".")
    parser.add_argument("--data-rev", default=None)
    parser.add_argument("--params-file", default="params.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="dotted.key=value (YAML value)")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--experiment", default=None)
    args = parser.parse_args()
    from gara.cli import _parse_sets

    print(json.dumps(retrain(args.workdir, args.data_rev, args.params_file, _parse_sets(args.sets),
                             args.ray_address, args.experiment), indent=2, default=str))

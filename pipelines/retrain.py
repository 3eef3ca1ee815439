"""Prefect 3 flow ``retrain``: the DVC pipeline (``dvc.yaml``), stage by stage, as Prefect tasks.

    pull_data -> one task per dvc.yaml stage, in its order (``dvc repro STAGE``)
              -> markdown artifact (the evaluation's summary and the publish decision)

The flow wires nothing itself: stages, commands, deps and params are ``dvc.yaml``'s, so a flow
run and ``dvc repro`` produce the same rows from the same inputs, and DVC alone decides what is
stale (its lock and run cache: an unchanged stage is skipped, a stage seen before is restored).
Prefect adds what DVC lacks: a schedule, a record of every run, retries with backoff for the
faults a cluster has (S3, the Ray cluster, the tracking server), and one publish at a time
across the cluster (a global concurrency limit around the stage that moves aliases).

A stage that fails for good fails the flow before any later stage runs: a failed training or
evaluation never reaches ``publish``, and the registry keeps its champion.

Parameters change through the project (``params.yaml`` at the revision checked out), never
through the flow, so what ran is always what ``dvc.lock`` says. Where a run happens is the
environment's business: ``ray_address`` (or ``RAY_ADDRESS``), ``MLFLOW_TRACKING_URI``.

Run it directly (``python pipelines/retrain.py --help``) or through the deployment in
``prefect.yaml`` / ``pipelines/serve.py`` (cron schedule).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gara importable when run as a script

from gara.registry.publish import DEFAULT_RECORD  # noqa: E402

PROMOTION_LIMIT = "gara-promote"  # global concurrency limit: one publish at a time, cluster-wide
PUBLISH_COMMAND = "gara.cli publish"  # the stage whose command contains this moves registry aliases
STAGE_RETRIES = 2
TAIL = 3000  # characters of a failed command's output kept in the error


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage exited non-zero; the message holds the end of its output."""


def _dvc(args: list[str], workdir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workdir, env=env, capture_output=True,
                          text=True)


def pipeline_stages(workdir: Path) -> list[tuple[str, bool]]:
    """(stage, whether it publishes) for every stage of the project's dvc.yaml, in
    ``dvc stage list`` order. Each stage runs as ``dvc repro STAGE``, which brings whatever
    it depends on up to date first, so the order is an optimisation, never a correctness
    matter."""
    import yaml

    listed = _dvc(["stage", "list", "--name-only"], workdir)
    if listed.returncode != 0:
        raise StageFailed(f"dvc stage list in {workdir} failed: {listed.stderr[-TAIL:]}")
    defined = (yaml.safe_load((workdir / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages") or {}
    stages = []
    for name in (line.strip() for line in listed.stdout.splitlines()):
        if name:
            stage = defined.get(name.split("@")[0]) or {}
            command = json.dumps(stage.get("cmd") or (stage.get("do") or {}).get("cmd"))
            stages.append((name, PUBLISH_COMMAND in command))
    return stages


# --- tasks ---------------------------------------------------------------------------------


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.2)
def pull_data(workdir: str, data_rev: str | None) -> str:
    """Check out data.dvc at ``data_rev`` (None: as committed) and ``dvc pull`` it; returns its hash."""
    import yaml

    root = Path(workdir)
    if data_rev:
        subprocess.run(["git", "checkout", data_rev, "--", "data.dvc"], cwd=root, check=True,
                       capture_output=True)
    proc = _dvc(["pull", "data.dvc"], root)
    if proc.returncode != 0:
        raise StageFailed(f"dvc pull data.dvc failed ({proc.returncode}): {proc.stderr[-TAIL:]}")
    outs = (yaml.safe_load((root / "data.dvc").read_text(encoding="utf-8")) or {}).get("outs") or [{}]
    return str(outs[0].get("md5") or outs[0].get("hash") or "unknown")


@task(retries=STAGE_RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_jitter_factor=0.2, task_run_name="stage {stage}")
def run_stage(workdir: str, stage: str, ray_address: str | None) -> str:
    """``dvc repro STAGE``: DVC runs what is stale, skips the rest; returns "ran" or "skipped".
    (The environment is inherited, never a task parameter: it holds credentials.)"""
    logger = get_run_logger()
    env = {**os.environ, "RAY_ADDRESS": ray_address} if ray_address else None
    proc = _dvc(["repro", stage], Path(workdir), env)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise StageFailed(f"dvc repro {stage} failed ({proc.returncode}):\n{output[-TAIL:]}")
    outcome = "ran" if f"Running stage '{stage}'" in output else "skipped"
    logger.info("stage %s %s\n%s", stage, outcome, output[-TAIL:])
    return outcome


# --- the flow ------------------------------------------------------------------------------


def summary_markdown(metrics: dict[str, Any], record: dict[str, Any], outcomes: dict[str, str]) -> str:
    rows = ["| model | Clear box IoU | Degrade box IoU | Clear point IoU | Degrade point IoU |",
            "|---|---|---|---|---|"]
    for name, model in metrics["models"].items():
        s = model["summary"]

        def cell(split: str, kind: str, s=s) -> str:
            value = (s.get(split) or {}).get(kind, {}).get("iou")
            return "-" if value is None else f"{value:.1f}"

        label = f"{name} (candidate)" if name == record["candidate"] else name
        rows.append(f"| {label} | {cell('clear', 'box')} | {cell('degrade', 'box')} | "
                    f"{cell('clear', 'point')} | {cell('degrade', 'point')} |")
    verdict = "**promoted to champion**" if record["promoted"] else "**not promoted**"
    stages = ", ".join(f"{name} {outcome}" for name, outcome in outcomes.items())
    return "\n".join([
        f"# Retrain: {record['name']} version {record['version']}", "",
        f"Stages: {stages}.", "",
        f"Evaluation set `{metrics['evaluation_set']}`, {metrics['images']['evaluated']} images.", "",
        *rows, "",
        f"Promotion: {verdict}: {record['reason']}.",
        f"Champion is now version {record['champion']}.",
    ])


@flow(name="retrain", log_prints=True)
def retrain(workdir: str = ".", data_rev: str | None = None, ray_address: str | None = None
            ) -> dict[str, Any]:
    """Pull the DVC data revision, then bring every dvc.yaml stage up to date, publish included.

    workdir: the project checkout to run in. data_rev: git revision of data.dvc (None: as
    checked out). ray_address: an existing Ray cluster for the stages that use Ray (train; corrupt
    and evaluate when params.yaml sets their ray_workers) (None: RAY_ADDRESS, else a local Ray per
    stage).
    """
    from gara.config import load_params

    logger = get_run_logger()
    root = Path(workdir).resolve()
    data_hash = pull_data(str(root), data_rev)
    logger.info("data.dvc at %s: %s", data_rev or "the checked-out revision", data_hash)
    outcomes: dict[str, str] = {}
    for stage, publishes in pipeline_stages(root):
        if publishes:
            # strict=False: without the limit defined on the server this still runs (the
            # registry's own lock serialises promotions from one host; define it for a cluster).
            with concurrency(PROMOTION_LIMIT, occupy=1, strict=False):
                outcomes[stage] = run_stage(str(root), stage, ray_address)
        else:
            outcomes[stage] = run_stage(str(root), stage, ray_address)
    record = json.loads((root / DEFAULT_RECORD).read_text(encoding="utf-8"))
    params = load_params(root / "params.yaml")
    metrics = json.loads((root / params.evaluate.out / "metrics.json").read_text(encoding="utf-8"))
    create_markdown_artifact(
        markdown=summary_markdown(metrics, record, outcomes), key="retrain-report",
        description=f"{record['name']} v{record['version']}: evaluation and promotion")
    return {"stages": outcomes, "published": record, "data_hash": data_hash}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the retrain flow once, in this process.")
    parser.add_argument("--workdir", default=".")
    parser.add_argument("--data-rev", default=None)
    parser.add_argument("--ray-address", default=None)
    args = parser.parse_args()
    print(json.dumps(retrain(args.workdir, args.data_rev, args.ray_address), indent=2, default=str))

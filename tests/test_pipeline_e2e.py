"""End to end on the embedded default, as a user runs it: ``dvc repro`` in a fresh clone pulls
nothing but the in-repo sample, corrupts it, trains GaRA on LiteMedSAM with Ray Train from the
labelled split and again by label-free distillation from the unlabelled photos, evaluates both
and the frozen base on the same images and prompts, and publishes: the gate
decides on the paired interval. A second ``dvc repro`` does nothing (the
publish stage finds the store in step); with ``mlflow.db`` deleted, the next one publishes
into the new store. A teammate then pulls the champion with no configuration.

The clone's params.yaml is cut to 2 training steps on one Ray worker and 6 evaluation photos
(a user's edit, tracked by DVC like any other): the pipeline's contract, not its numbers, is
under test here (2-worker DDP with a killed worker: tests/test_train.py).
Whether GaRA beats the base is a research result with a spread: ``bench/bench_seeds.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gara.config import load_params

REPO = Path(__file__).resolve().parents[1]
# Training + evaluating LiteMedSAM on 2 CPU cores takes minutes: above the suite's per-test limit.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1500) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the project's git checkout")
    target = tmp_path_factory.mktemp("e2e") / "repo"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], check=True, timeout=300)
    return target


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # dvc.yaml calls `python`
    env.update(DVC_NO_ANALYTICS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_pipeline_trains_evaluates_publishes_is_a_no_op_again_and_republishes_into_a_new_store(
        clone: Path, env: dict[str, str]):
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "pull", "data.dvc"], clone, env)  # the in-repo store: no credentials, no network
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["train"].update(max_steps_per_epoch=2, val_max_images=2, num_workers=1)
    params["evaluate"]["max_images"] = 6
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    first = _run([*dvc, "repro"], clone, env)
    for stage in ("corrupt", "train@gara", "train@gara_distill", "evaluate", "publish"):
        assert f"Running stage '{stage}'" in first
    # The label-free row trained on the unlabelled photos (a plain folder: no annotation at all).
    corrupted = clone / "artifacts" / "corrupted"
    unlabelled = json.loads((corrupted / "unlabelled" / "annotations.json").read_text())
    assert unlabelled["annotations"] == [] and len(unlabelled["images"]) > 0
    adapter = clone / "artifacts" / "adapters" / "gara"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.json", "adapter.safetensors"]
    metrics = json.loads((clone / "reports" / "eval" / "metrics.json").read_text())
    gara = metrics["models"]["gara"]
    assert metrics["models"]["gara_distill"]["paired"]["base"]["degrade"]["box"]["iou"]["n_sources"] == 6
    assert metrics["primary"] == "gara" and metrics["images"]["source_images"] == 6
    gain = gara["paired"]["base"]["degrade"]["box"]["iou"]
    clear = gara["paired"]["base"]["clear"]["box"]["iou"]
    for name, cell in (("degrade", gain), ("clear", clear)):
        print(f"gara - base, box IoU {name}: {cell['delta']:+.2f} "
              f"[{cell['ci_low']:+.2f}, {cell['ci_high']:+.2f}] over {cell['n_sources']} sources")
        assert cell["ci_low"] <= cell["delta"] <= cell["ci_high"] and cell["n_sources"] == 6

    record = json.loads((clone / "reports" / "registry" / "publish.json").read_text())
    gate = load_params(clone / "params.yaml").registry.gate  # degrade.box.iou / clear.box.iou
    wins = gain["ci_low"] > gate.margin and clear["ci_low"] > -gate.max_clear_drop
    assert record["promoted"] == wins, record
    assert (record["champion"] == record["version"]) == wins  # else the frozen base is champion
    assert record["store"] == f"sqlite:///{clone / 'mlflow.db'}"  # the repo's own store

    again = _run([*dvc, "repro"], clone, env)
    assert "Running stage 'train" not in again and "Running stage 'evaluate'" not in again
    assert "nothing to do" in again  # publish: the store holds this version and a champion

    (clone / "mlflow.db").unlink()  # a new, empty tracking store
    fresh = _run([*dvc, "repro"], clone, env)
    assert "Running stage 'train" not in fresh and "nothing to do" not in fresh
    republished = json.loads((clone / "reports" / "registry" / "publish.json").read_text())
    assert republished["promoted"] == wins and republished["champion"] is not None

    # Pull the champion as a teammate would: from the repository root with no configuration
    # (gara predict finds mlflow.db by itself).
    coco = json.loads((clone / "data" / "val" / "annotations.json").read_text())
    image = coco["images"][0]
    x, y, w, h = next(a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"])
    _run([sys.executable, "-m", "gara.cli", "predict", "--image", f"data/val/{image['file_name']}",
          "--box", f"{x},{y},{x + w},{y + h}", "--out", "mask.png"], clone, env)
    assert (clone / "mask.png").stat().st_size > 0

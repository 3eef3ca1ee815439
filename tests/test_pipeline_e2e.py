"""End to end on the embedded default: DVC pulls the sample, corrupts it, Ray Train trains a
GaRA adapter on LiteMedSAM (2 CPU workers), the evaluation compares it with the frozen base
on the same images and prompts, and the gate decides on the paired interval.

Whether GaRA beats the base at this budget is a research result, measured with its spread
over training seeds by ``bench/bench_seeds.py``; this test checks the pipeline's contract.

Runs in a fresh clone of this repository's HEAD (as a user would), with this interpreter's
environment; takes several minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_pipeline_trains_evaluates_gates_on_intervals_and_serves_the_champion(clone: Path,
                                                                              env: dict[str, str]):
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "pull", "data.dvc"], clone, env)  # the in-repo store: no credentials, no network
    assert (clone / "data" / "val" / "annotations.json").is_file()

    _run([*dvc, "repro", "train@gara"], clone, env)
    adapter = clone / "artifacts" / "adapters" / "gara"
    assert (adapter / "adapter.safetensors").is_file() and (adapter / "adapter.json").is_file()
    assert (clone / "mlflow.db").is_file(), "the default tracking store is the repo's mlflow.db"

    again = _run([*dvc, "repro", "train@gara"], clone, env)
    assert "didn't change, skipping" in again and "Running stage" not in again

    out = clone / "reports" / "e2e"
    _run([sys.executable, "-m", "gara.cli", "evaluate", "--params", "params.yaml", "--out", str(out),
          "--model", "base", "--model", f"gara={adapter}", "--no-progress"], clone, env)
    metrics = json.loads((out / "metrics.json").read_text())
    gara = metrics["models"]["gara"]
    assert metrics["primary"] == "gara" and metrics["summary"] == gara["summary"]
    # The gate's evaluation set: >= 24 distinct source photos, every corruption type present.
    assert metrics["images"]["source_images"] >= 24 and len(metrics["corruption_types"]) == 17
    gain = gara["paired"]["base"]["degrade"]["box"]["iou"]
    clear = gara["paired"]["base"]["clear"]["box"]["iou"]
    for name, cell in (("degrade", gain), ("clear", clear)):
        print(f"gara - base, box IoU {name}: {cell['delta']:+.2f} "
              f"[{cell['ci_low']:+.2f}, {cell['ci_high']:+.2f}] over {cell['n_sources']} sources")
        assert cell["ci_low"] <= cell["delta"] <= cell["ci_high"] and cell["n_sources"] >= 24

    # Register and gate it in the repo's own store, then pull the champion as a teammate would:
    # from the repository root with no configuration (gara predict finds mlflow.db by itself).
    gara_cli = [sys.executable, "-m", "gara.cli"]
    registered, promotion = clone / "reports" / "registered.json", clone / "reports" / "promotion.json"
    _run([*gara_cli, "register", "--adapter", str(adapter), "--report", str(out), "--out", str(registered)],
         clone, env)
    _run([*gara_cli, "promote", "--registered", str(registered), "--out", str(promotion)], clone, env)
    decision = json.loads(promotion.read_text())
    gate = load_params(clone / "params.yaml").registry.gate  # degrade.box.iou / clear.box.iou
    wins = gain["ci_low"] > gate.margin and clear["ci_low"] > -gate.max_clear_drop
    assert decision["compared_with"] == "base" and decision["promoted"] == wins, decision
    assert decision["gate_difference"] == gain  # the gate read the report's own interval
    registered_version = json.loads(registered.read_text())["version"]
    assert (decision["champion"] == registered_version) == wins  # else the frozen base is champion

    coco = json.loads((clone / "data" / "val" / "annotations.json").read_text())
    image = coco["images"][0]
    x, y, w, h = next(a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"])
    box = f"{x},{y},{x + w},{y + h}"
    photo = f"data/val/{image['file_name']}"
    _run([*gara_cli, "predict", "--image", photo, "--box", box, "--out", "mask.png"], clone, env)
    assert (clone / "mask.png").stat().st_size > 0

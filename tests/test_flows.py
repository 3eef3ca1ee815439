"""The Prefect retrain flow on real servers: Prefect, MLflow, an S3 server, Ray.

A tiny DVC project (this checkout's dvc.yaml and gara/, blob images, a vit_tiny base) is served
as the deployment ``retrain/nightly`` with its cron schedule, triggered on demand, and must run
dvc.yaml's stages and finish with a new model version. Then a changed parameter is evaluated
again with an S3 upload that always fails (the publish stage is retried, the flow fails, and the
registry and its champion stay as they were), and again with one that fails once (DVC skips
the finished stages, the retried publish lands once). Faults come from a real HTTP proxy in
front of the S3 server; MLflow clients upload to S3 directly (``--no-serve-artifacts``)
through it, with boto3's own retries off so the flow's retry is what recovers.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from gara.config import load_params
from gara.registry.store import CHAMPION, client_for
from pipelines.retrain import STAGE_RETRIES
from tests.conftest import free_port, publish_base, running_mlflow_server
from tests.test_train import make_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = "flows-model"
# A flow run is the whole pipeline (5 stages, 2 Ray trainings): minutes on 2 busy cores, above
# the suite's per-test limit. The limits here catch a hang, not a slow machine.
pytestmark = pytest.mark.timeout(1800)


class FlakyS3Proxy:
    """Forwards every request to the S3 server, except that it answers PUTs (to paths holding
    ``fail_path``) with a 500 while ``fail_puts`` > 0 (counting down) or ``fail_all_puts`` is set."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.fail_puts, self.fail_all_puts, self.failed = 0, False, 0
        self.fail_path = ""  # only PUTs whose path contains this fail
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return None

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT" and proxy.fail_path in self.path and proxy._should_fail():
                    payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _should_fail(self) -> bool:
        with self.lock:
            if self.fail_all_puts or self.fail_puts > 0:
                self.fail_puts = max(0, self.fail_puts - 1)
                self.failed += 1
                return True
            return False

    def __enter__(self) -> FlakyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server, mlflow_db_template, prefect_server, tiny_vit_checkpoint):
    """Servers + a tiny DVC project; yields the environment a flow run needs."""
    bucket = s3_server.new_bucket()
    root = tmp_path_factory.mktemp("flows")
    server_env = {**s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url}
    with FlakyS3Proxy(s3_server.endpoint_url) as proxy, running_mlflow_server(
        root / "mlflow", mlflow_db_template, f"s3://{bucket}/mlflow", server_env, proxy_artifacts=False
    ) as mlflow_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PREFECT_"))}
        env.update(s3_server.env())
        env.update(prefect_server)
        env.update({
            "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_S3_ENDPOINT_URL": proxy.url,
            "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",  # boto3 must not hide the fault
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
            "DVC_NO_ANALYTICS": "1", "GARA_CACHE_DIR": str(root / "cache"),
        })
        base_uri = publish_base(s3_server, tiny_vit_checkpoint.path)
        project = tiny_project(root / "project", tiny_vit_checkpoint.path, base_uri, env)
        yield {"env": env, "project": project, "proxy": proxy, "mlflow": mlflow_url,
               "prefect": prefect_server}


def tiny_project(path: Path, base: Path, base_uri: str, env: dict[str, str]) -> Path:
    """A git + DVC project: this checkout's dvc.yaml and gara/, blob images (labelled train and
    val, a plain unlabelled folder) tracked by data.dvc and pushed to a local remote, and a
    complete params.yaml sized for seconds of training."""
    make_dataset(path / "data" / "train", 6, 0)
    make_dataset(path / "data" / "val", 3, 1)
    unlabelled = make_dataset(path / "unlabelled-src", 3, 2) / "images"  # its pictures, no annotations
    shutil.move(unlabelled, path / "data" / "unlabelled")  # a plain folder: the unlabelled kind
    shutil.rmtree(path / "unlabelled-src")
    shutil.copy2(REPO / "dvc.yaml", path / "dvc.yaml")
    shutil.copytree(REPO / "gara", path / "gara", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(path, {
        "corrupt.types": ["fog", "gaussian_noise"], "corrupt.severities": [2],
        "corrupt.train_variants_per_image": 1, "corrupt.val_variants_per_image": 1,
        "model.backbone": "vit_tiny", "model.checkpoint": str(base),
        "model.adapter.low_rank": 4, "model.adapter.high_rank": 8, "model.adapter.rank": 4,
        "train.epochs": 1, "train.batch_size": 2, "train.max_steps_per_epoch": 3, "train.lr": 1e-3,
        "train.num_workers": 1, "train.val_max_images": 2, "train.mixed_precision": "no",
        "train.max_failures": 0, "train.mlflow.experiment": "flows",
        "evaluate.prompts.kinds": ["box"], "evaluate.overlay_images": 0, "evaluate.mixed_precision": "no",
        "registry.name": MODEL, "registry.base_uri": base_uri,
        "registry.gate.margin": 0.0, "registry.gate.max_clear_drop": 100.0,
    })
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"],
                [*dvc, "remote", "add", "-d", "store", str(path.parent / "dvc-store")],
                [*dvc, "add", "-q", "data"], [*dvc, "push", "-q"],
                ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data"]):
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True, timeout=300)
    shutil.rmtree(path / "data")  # the flow must pull it
    return path


def write_params(project: Path, overrides: dict) -> None:
    """Every key DVC interpolates or tracks must be in params.yaml: write the whole tree."""
    previous = project / "params.yaml"
    params = load_params(previous if previous.exists() else None, overrides)
    previous.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


def versions(stack) -> list[str]:
    client = client_for(stack["mlflow"])
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))


def champion(stack) -> str | None:
    try:
        return str(client_for(stack["mlflow"]).get_model_version_by_alias(MODEL, CHAMPION).version)
    except Exception:
        return None


def run_flow(stack) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "pipelines" / "retrain.py"), "--workdir", str(stack["project"])]
    return subprocess.run(cmd, env=stack["env"], capture_output=True, text=True, timeout=900)


def prefect_api(stack, method: str, path: str, body: dict | None = None):
    import urllib.request

    request = urllib.request.Request(
        f"{stack['prefect']['PREFECT_API_URL']}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def test_deployment_with_cron_runs_on_demand_and_registers_a_version(stack):
    env = stack["env"]
    serve = subprocess.Popen(
        [sys.executable, str(REPO / "pipelines" / "serve.py"), "--param", f"workdir={stack['project']}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deployment = None
        deadline = time.monotonic() + 120
        while deployment is None:
            assert serve.poll() is None, serve.stdout.read()[-3000:]
            try:
                deployment = prefect_api(stack, "GET", "/deployments/name/retrain/nightly")
            except OSError:
                assert time.monotonic() < deadline, "the deployment was not registered within 120 s"
                time.sleep(1)
        schedules = [s["schedule"] for s in deployment["schedules"]]
        assert schedules and schedules[0]["cron"] == "0 2 * * *"
        assert deployment["parameters"]["workdir"] == str(stack["project"])

        before, had_champion = versions(stack), champion(stack) is not None
        trigger = subprocess.run([str(Path(sys.executable).with_name("prefect")), "deployment", "run",
                                  "retrain/nightly"], env=env, capture_output=True, text=True, timeout=120)
        assert trigger.returncode == 0, trigger.stderr
        deadline = time.monotonic() + 1200
        state = None
        while state not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert time.monotonic() < deadline, "the triggered run did not finish within 1200 s"
            time.sleep(3)
            runs = prefect_api(stack, "POST", "/flow_runs/filter",
                               {"deployments": {"id": {"any_": [deployment["id"]]}},
                                "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}}})
            state = runs[0]["state_type"] if runs else None
        assert state == "COMPLETED", serve.stdout.read()[-5000:] if serve.poll() is not None else state
        client = client_for(stack["mlflow"])
        kinds = sorted(client.get_model_version(MODEL, v).tags["adapter_kind"]
                       for v in versions(stack) if v not in before)
        # The trained adapter; with no champion yet the gate also registered the frozen base.
        assert kinds == (["gara"] if had_champion else ["gara", "none"])
        assert champion(stack) is not None  # the adapter, or the frozen base it did not beat
        artifacts = prefect_api(stack, "POST", "/artifacts/filter",
                                {"artifacts": {"key": {"any_": ["retrain-report"]}}})
        assert artifacts and "Promotion:" in artifacts[0]["data"]
        assert "| gara (candidate) |" in artifacts[0]["data"]
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=30)


def test_a_lasting_upload_fault_changes_nothing_and_a_passing_one_is_retried(stack):
    before, champion_before = versions(stack), champion(stack)
    proxy = stack["proxy"]
    write_params(stack["project"], {"evaluate.seed": 1})  # new prompts: a new evaluation to publish

    # Every upload of the registered model fails: the publish stage gives up after its retries
    # and the flow fails; the new evaluation did finish (DVC's lock).
    proxy.fail_path, proxy.fail_all_puts, proxy.failed = "/models/", True, 0
    try:
        broken = run_flow(stack)
    finally:
        proxy.fail_all_puts = False
    assert broken.returncode != 0
    assert proxy.failed >= 1 + STAGE_RETRIES, "a failed upload per attempt: the first try and each retry"
    assert versions(stack) == before, "a failed run registers nothing"
    assert champion(stack) == champion_before, "and the champion stays"

    # Same inputs, one failing upload: DVC skips the finished stages, publish is retried once
    # and lands once.
    proxy.fail_puts, proxy.failed = 1, 0
    once = run_flow(stack)
    assert once.returncode == 0, once.stderr[-4000:]
    assert proxy.failed == 1
    result = json.loads(once.stdout[once.stdout.index("{"):])
    assert result["stages"] == {"corrupt": "skipped", "train@gara": "skipped",
                                "train@gara_distill": "skipped", "evaluate": "skipped", "publish": "ran"}
    assert len(versions(stack)) == len(before) + 1
    assert result["published"]["version"] == versions(stack)[-1]
    publishes = {"task_runs": {"name": {"like_": "stage publish"}}}
    runs = prefect_api(stack, "POST", "/task_runs/filter", publishes)
    # this run's one retry, and the broken run's first try + every retry
    assert sorted(t["run_count"] for t in runs)[-2:] == [2, 1 + STAGE_RETRIES]

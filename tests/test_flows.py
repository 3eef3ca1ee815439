"""The Prefect retrain flow on real servers: Prefect, MLflow (SQLite), an S3 server, Ray.

A tiny DVC project (vit_tiny base, blob images) is served as the deployment
``retrain/nightly`` with its cron schedule, triggered on demand, and must finish with a new
model version. Then the flow runs with an S3 upload that fails once (it must retry and
succeed) and with uploads that always fail (the registry and its champion must stay as they
were). Faults come from a real HTTP proxy in front of the S3 server; MLflow clients upload
to S3 directly (``--no-serve-artifacts``) through it, with boto3's own retries off so the
flow's retry is what recovers.
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

from gara.registry.store import CHAMPION, client_for
from tests.conftest import free_port, publish_base, running_mlflow_server
from tests.test_train import make_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = "flows-model"


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
    """A git + DVC project with blob images tracked by data.dvc and pushed to a local remote."""
    make_dataset(path / "data" / "train", 6, 0)
    make_dataset(path / "data" / "val", 3, 1)
    params = {
        "corrupt": {"seed": 0, "types": ["fog", "gaussian_noise"], "severities": [2],
                    "train_variants_per_image": 1},
        "model": {"backbone": "vit_tiny", "checkpoint": str(base),
                  "adapter": {"kind": "gara", "low_rank": 4, "high_rank": 8}},
        "train": {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 3, "lr": 1e-3, "num_workers": 1,
                  "val_max_images": 2, "mixed_precision": "no", "max_failures": 0,
                  "mlflow": {"experiment": "flows"}},
        "evaluate": {"prompts": {"kinds": ["box"]}, "overlay_images": 0, "mixed_precision": "no"},
        "registry": {"name": MODEL, "candidate": "gara", "base_uri": base_uri,
                     "gate": {"margin": 0.0, "max_clear_drop": 100.0}},
    }
    (path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"],
                [*dvc, "remote", "add", "-d", "store", str(path.parent / "dvc-store")],
                [*dvc, "add", "-q", "data"], [*dvc, "push", "-q"],
                ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data"]):
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True, timeout=300)
    shutil.rmtree(path / "data")  # the flow must pull it
    return path


def versions(stack) -> list[str]:
    client = client_for(stack["mlflow"])
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))


def champion(stack) -> str | None:
    try:
        return str(client_for(stack["mlflow"]).get_model_version_by_alias(MODEL, CHAMPION).version)
    except Exception:
        return None


def run_flow(stack, *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "pipelines" / "retrain.py"), "--workdir", str(stack["project"])]
    for item in sets:
        cmd += ["--set", item]
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
        deadline = time.monotonic() + 600
        state = None
        while state not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert time.monotonic() < deadline, "the triggered run did not finish within 600 s"
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

    # Every upload of the registered model fails: registration gives up after its retries and
    # the flow fails before promotion.
    proxy.fail_path, proxy.fail_all_puts, proxy.failed = "/models/", True, 0
    try:
        broken = run_flow(stack, "train.seed=1")
    finally:
        proxy.fail_all_puts = False
    assert broken.returncode != 0
    assert proxy.failed >= 4, "at least one failed upload per attempt: the first try and 3 retries"
    assert versions(stack) == before, "a failed run registers nothing"
    assert champion(stack) == champion_before, "and the champion stays"

    # Same inputs, one failing upload: training and evaluation come from the cache, the
    # registration is retried once and lands once.
    proxy.fail_puts, proxy.failed = 1, 0
    once = run_flow(stack, "train.seed=1")
    assert once.returncode == 0, once.stderr[-4000:]
    assert proxy.failed == 1
    assert len(versions(stack)) == len(before) + 1
    result = json.loads(once.stdout[once.stdout.index("{"):])
    assert result["registered"]["version"] == versions(stack)[-1]
    def task_runs(name: str) -> list[dict]:
        return prefect_api(stack, "POST", "/task_runs/filter", {"task_runs": {"name": {"like_": name}}})

    tasks = task_runs("register_version")
    assert sorted(t["run_count"] for t in tasks)[-2:] == [2, 4]  # this run's retry, the broken run's 4
    trains = task_runs("train_adapter")
    assert sum(t["state_name"] == "Cached" for t in trains) >= 1, [t["state_name"] for t in trains]

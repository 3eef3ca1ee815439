"""The local stack (infra/local/stack.py) for real: up on free ports, used, down.

One stack serves the module; it is started and stopped through the CLI exactly as a user
(or the Prefect deployment test) would: ``up --state-dir TMP --ports auto`` / ``down``.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "infra" / "local" / "stack.py"
CONTRACT = yaml.safe_load((ROOT / "infra" / "contract.yaml").read_text(encoding="utf-8"))

pytestmark = pytest.mark.slow


def run_stack(*args: object, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STACK), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def up_args(state: Path) -> list[object]:
    # Small Ray (1 CPU, 80 MiB object store): the machine has 2 cores shared with other work.
    return ["up", "--state-dir", state, "--ports", "auto", "--ray-cpus", 1, "--ray-object-store-mb", 80]


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def processes_in(state: Path) -> list[psutil.Process]:
    """Every process whose working directory is the state dir (each server starts there)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and Path(proc.cwd()) == state:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def port_free(port: int) -> bool:
    """Nothing listens there (TIME_WAIT leftovers of closed connections do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Stack:
    state: Path
    manifest: dict
    env: dict[str, str]
    stdout: str
    up_seconds: float


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stack").resolve()
    t0 = time.monotonic()
    up = run_stack(*up_args(state))
    elapsed = time.monotonic() - t0
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        manifest = json.loads((state / "stack.json").read_text(encoding="utf-8"))
        yield Stack(state, manifest, read_env_file(state / "env.sh"), up.stdout, elapsed)
    finally:
        run_stack("down", "--state-dir", state)  # a no-op once test_down has run


def test_up_reports_urls_and_env_without_showing_secrets(stack: Stack) -> None:
    print(f"stack up in {stack.up_seconds:.1f} s:\n{stack.stdout}")
    services = stack.manifest["services"]
    assert set(services) == {"s3", "mlflow", "prefect", "ray"}
    for name, rec in services.items():
        assert rec["url"] in stack.stdout and str(rec["pid"]) in stack.stdout
        assert "127.0.0.1" in rec["url"], name
        assert f"{name:<8} healthy after" in stack.stdout
    env_file = stack.state / "env.sh"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert set(stack.env) <= set(CONTRACT["env"]), "env.sh sets a variable the contract does not list"
    assert stack.env["MLFLOW_TRACKING_URI"] == services["mlflow"]["url"]
    assert stack.env["PREFECT_API_URL"] == services["prefect"]["url"] + "/api"
    assert stack.env["RAY_ADDRESS"] == services["ray"]["url"]
    assert stack.env["AWS_ENDPOINT_URL"] == stack.env["MLFLOW_S3_ENDPOINT_URL"] == services["s3"]["url"]
    secret = stack.env["AWS_SECRET_ACCESS_KEY"]
    manifest_text = (stack.state / "stack.json").read_text(encoding="utf-8")
    assert secret and secret not in stack.stdout and secret not in manifest_text
    assert stack.env["AWS_ACCESS_KEY_ID"] not in stack.stdout
    # Ray's socket paths must stay short: a long pytest tmp dir sends its temp dir to /tmp.
    assert len(stack.manifest["ray_temp_dir"]) <= 40


def test_s3_store_answers_boto3(stack: Stack) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=stack.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"])
    bucket = f"test-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="hello.txt", Body=b"hi")
    names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert {bucket, stack.manifest["bucket"]} <= names
    assert client.get_object(Bucket=bucket, Key="hello.txt")["Body"].read() == b"hi"


def test_mlflow_artifact_lands_in_the_s3_bucket(stack: Stack, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from mlflow import MlflowClient

    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    (tmp_path / "note.txt").write_text("lands in s3", encoding="utf-8")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)

    s3 = boto3.client("s3", endpoint_url=stack.env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    key = f"mlflow/{experiment_id}/{run.info.run_id}/artifacts/note.txt"
    body = s3.get_object(Bucket=stack.manifest["bucket"], Key=key)["Body"].read()
    assert body == b"lands in s3"
    assert (stack.state / "mlflow" / "mlflow.db").exists()


def test_prefect_server_is_healthy_and_uses_its_own_home(stack: Stack) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{stack.env['PREFECT_API_URL']}/health", timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read()) is True
    assert (stack.state / "prefect" / "prefect.db").exists()


def test_ray_head_runs_a_task(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address=stack.env["RAY_ADDRESS"], log_to_driver=False)
    try:
        assert ray.get(ray.remote(lambda x: x * 2).remote(21), timeout=120) == 42
        assert ray.cluster_resources().get("CPU") == 1
    finally:
        ray.shutdown()


def test_status_reports_every_server_healthy(stack: Stack) -> None:
    status = run_stack("status", "--state-dir", stack.state, "--json", timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["running"] and all(s["healthy"] for s in report["services"].values())


def test_up_again_refuses_while_running(stack: Stack) -> None:
    again = run_stack(*up_args(stack.state), timeout=60)
    assert again.returncode == 1
    assert "already running" in again.stderr and "down --state-dir" in again.stderr
    for name, rec in stack.manifest["services"].items():  # the running stack is untouched
        assert psutil.pid_exists(rec["pid"]), name
    assert json.loads((stack.state / "stack.json").read_text(encoding="utf-8")) == stack.manifest


def test_down_stops_everything_and_is_idempotent(stack: Stack) -> None:
    services = stack.manifest["services"]
    tree = {p.pid: p for rec in services.values()
            for p in [psutil.Process(rec["pid"]), *psutil.Process(rec["pid"]).children(recursive=True)]}
    t0 = time.monotonic()
    down = run_stack("down", "--state-dir", stack.state, timeout=120)
    print(f"stack down in {time.monotonic() - t0:.1f} s:\n{down.stdout}")
    assert down.returncode == 0, down.stderr
    for name, rec in services.items():
        assert f"stopped {name} (pid {rec['pid']}" in down.stdout
    _, alive = psutil.wait_procs(list(tree.values()), timeout=5)
    assert not alive, f"still running after down: {alive}"
    assert not processes_in(stack.state)
    assert all(port_free(rec["port"]) for rec in services.values())
    assert not (stack.state / "stack.json").exists() and not (stack.state / "env.sh").exists()
    if stack.manifest["ray_temp_dir_owned"]:  # a /tmp folder of its own: removed; in the state dir: kept
        assert not Path(stack.manifest["ray_temp_dir"]).exists()

    again = run_stack("down", "--state-dir", stack.state, timeout=60)
    assert again.returncode == 0 and "nothing to stop" in again.stdout


def test_port_in_use_is_named_and_nothing_starts(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_stack("up", "--state-dir", tmp_path, "--ports", "auto", "--mlflow-port", port,
                           timeout=60)
    assert result.returncode == 1
    assert f"port {port} (mlflow) is already in use" in result.stderr
    assert not (tmp_path / "stack.json").exists() and not processes_in(tmp_path.resolve())


def test_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    state = tmp_path.resolve()
    result = run_stack(*up_args(state), "--timeout", 2, timeout=120)
    assert result.returncode == 1
    assert "did not become healthy within 2 s" in result.stderr
    assert "last lines of" in result.stderr and str(state / "logs") in result.stderr
    assert "stopping what was started" in result.stderr
    assert not (state / "stack.json").exists()
    assert not processes_in(state)


def test_status_and_down_on_a_dir_without_a_stack(tmp_path: Path) -> None:
    status = run_stack("status", "--state-dir", tmp_path / "never", timeout=60)
    assert status.returncode == 1 and "no stack recorded" in status.stdout
    down = run_stack("down", "--state-dir", tmp_path / "never", timeout=60)
    assert down.returncode == 0 and "nothing to stop" in down.stdout
    assert not (tmp_path / "never").exists()


def test_down_after_a_crash_clears_the_record(tmp_path: Path) -> None:
    """Servers that died on their own: `down` says so and clears the record; `up` may start again."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"pid": dead.pid, "create_time": time.time() - 60, "port": 1, "url": "http://127.0.0.1:1",
              "log": str(tmp_path / "logs" / "s3.log"), "stop": "group", "cmd": "moto"}
    (tmp_path / "stack.json").write_text(json.dumps({"status": "running", "services": {"s3": record}}))
    (tmp_path / "env.sh").write_text("export AWS_ENDPOINT_URL=http://127.0.0.1:1\n")
    down = run_stack("down", "--state-dir", tmp_path, timeout=60)
    assert down.returncode == 0 and f"s3 (pid {dead.pid}) was not running" in down.stdout
    assert not (tmp_path / "stack.json").exists() and not (tmp_path / "env.sh").exists()

#!/usr/bin/env python
"""The local stack: an S3-compatible store, MLflow, Prefect and a Ray head, all on 127.0.0.1.

    python infra/local/stack.py up     [--state-dir .stack] [--ports default|auto] [--s3-port N ...]
    python infra/local/stack.py status [--state-dir .stack] [--json]
    python infra/local/stack.py down   [--state-dir .stack]

``up`` starts the four servers, waits until each answers its health check, then writes
``<state>/env.sh`` (``source`` it: the variables that point gara, MLflow, Prefect, boto3, DVC
and Ray at the stack) and ``<state>/stack.json`` (URLs, ports, PIDs), prints both and exits
0; the servers keep running. ``down`` stops exactly the processes ``up`` recorded (and
their children), nothing else: never ``ray stop``, which kills every Ray on the machine.

- S3: moto's server, **in memory**: buckets and objects vanish at ``down`` (the MLflow
  and Prefect SQLite databases under the state dir persist; ``up --fresh`` clears them).
- MLflow: SQLite store in ``<state>/mlflow``, artifacts proxied to ``s3://BUCKET/mlflow``.
- Prefect: ``prefect server start`` with its own PREFECT_HOME (``<state>/prefect``), so it
  never touches ~/.prefect; it runs the scheduler, so cron deployments fire.
- Ray: ``ray start --head --block`` bound to 127.0.0.1, no dashboard, token auth off
  (loopback only; the cluster configs use tokens).

The S3 credentials are random dummies (moto accepts any) that live only in env.sh (mode
0600); stdout and stack.json never show them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

HOST = "127.0.0.1"
SERVICES = ("s3", "mlflow", "prefect", "ray")  # started in this order, stopped all at once
CONTRACT = Path(__file__).resolve().parents[1] / "contract.yaml"
MANIFEST = "stack.json"
ENV_FILE = "env.sh"
LOCK_FILE = ".lock"
DEFAULT_BUCKET = "gara-local"
STOP_GRACE_S = 20.0
# Ray puts Unix sockets under its temp dir; their paths must stay under ~107 bytes, and the
# session folder plus socket name take ~62, so a long state dir gets a short /tmp folder.
RAY_TEMP_MAX_LEN = 40


class StackError(Exception):
    """A user-facing failure: one clear message, exit 1."""


def load_contract() -> dict[str, Any]:
    return yaml.safe_load(CONTRACT.read_text(encoding="utf-8"))


def default_ports(contract: dict[str, Any]) -> dict[str, int]:
    return {"s3": contract["s3_port"], "mlflow": contract["mlflow_port"],
            "prefect": contract["prefect_port"], "ray": contract["ray_gcs_port"]}


# --- small helpers -----------------------------------------------------------------------
def port_free(port: int) -> bool:
    """Nothing listens on HOST:port. SO_REUSEADDR as the servers use it, so the TIME_WAIT
    connections a just-stopped server leaves behind do not count as "in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def executable(name: str) -> str:
    """The tool installed beside this Python (the project's .venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found beside {sys.executable} or on PATH: run `make env` first")
    return found


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty)"


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def clean_env() -> dict[str, str]:
    """This process's environment minus every variable of the contract.

    A shell that sourced another stack's env.sh must not point these servers at it (the
    Prefect server's own services use PREFECT_API_URL; ``ray start`` reads RAY_ADDRESS).
    """
    names = set(load_contract()["env"])
    return {k: v for k, v in os.environ.items() if k not in names}


@contextlib.contextmanager
def state_lock(state: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per state dir (a second one fails at once)."""
    with (state / LOCK_FILE).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(f"another stack.py up/down is working on {state}; try again when it ends") \
                from None
        yield


# --- the manifest (stack.json) and recorded processes ------------------------------------
def read_manifest(state: Path) -> dict[str, Any] | None:
    path = state / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StackError(f"{path} is unreadable ({exc}); stop any leftover servers by hand, "
                         "then delete it") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def recorded_process(rec: dict[str, Any]) -> psutil.Process | None:
    """The recorded process if it still runs: same PID *and* start time (PIDs get reused)."""
    try:
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - rec["create_time"]) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def service_processes(rec: dict[str, Any]) -> list[psutil.Process]:
    """The recorded process, its descendants, and anything left in its process group.

    The group catches children orphaned by a crashed parent (e.g. uvicorn under mlflow);
    the descendants catch Ray's workers, which start their own sessions.
    """
    procs: dict[int, psutil.Process] = {}
    leader = recorded_process(rec)
    if leader is not None:
        procs[leader.pid] = leader
        with contextlib.suppress(psutil.Error):
            procs.update({p.pid: p for p in leader.children(recursive=True)})
    for proc in psutil.process_iter(["pid"]):
        try:
            if (proc.pid not in procs and os.getpgid(proc.pid) == rec["pid"]
                    and proc.create_time() >= rec["create_time"] - 0.05):
                procs[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    return list(procs.values())


def stop_services(records: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Stop the recorded services and their children, all at once (a SIGTERM each, SIGKILL
    for what is left after STOP_GRACE_S). Returns, per service, the seconds it took to stop,
    or None when nothing of it was running."""
    t0 = time.monotonic()
    procs = {name: service_processes(rec) for name, rec in records.items()}
    for name, rec in records.items():
        leader = recorded_process(rec)
        if not procs[name]:
            continue
        # `ray start --block` tears its own processes down in order on SIGTERM; signalling its
        # whole group at once can leave it waiting on a GCS that is already gone.
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if rec["stop"] == "leader" and leader is not None:
                leader.terminate()
            else:
                os.killpg(rec["pid"], signal.SIGTERM)
    stopped_at: dict[int, float] = {}
    everything = [p for group in procs.values() for p in group]
    _, alive = psutil.wait_procs(everything, timeout=STOP_GRACE_S,
                                 callback=lambda p: stopped_at.setdefault(p.pid, time.monotonic()))
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5, callback=lambda p: stopped_at.setdefault(p.pid, time.monotonic()))
    return {name: (max(stopped_at.get(p.pid, time.monotonic()) for p in group) - t0) if group else None
            for name, group in procs.items()}


def running_services(manifest: dict[str, Any]) -> dict[str, int]:
    return {name: rec["pid"] for name, rec in manifest.get("services", {}).items()
            if recorded_process(rec) is not None}


# --- starting ----------------------------------------------------------------------------
def resolve_ports(args: argparse.Namespace, contract: dict[str, Any]) -> dict[str, int]:
    defaults = default_ports(contract)
    ports: dict[str, int] = {}
    held: list[socket.socket] = []  # kept open until all are chosen: no port handed out twice
    try:
        for name in SERVICES:
            explicit = getattr(args, f"{name}_port")
            if explicit:
                ports[name] = explicit
            elif args.ports == "auto":
                while True:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.bind((HOST, 0))
                    held.append(sock)
                    if sock.getsockname()[1] not in {getattr(args, f"{n}_port") for n in SERVICES}:
                        break
                ports[name] = sock.getsockname()[1]
            else:
                ports[name] = defaults[name]
    finally:
        for sock in held:
            sock.close()
    taken = {p for p in ports.values() if list(ports.values()).count(p) > 1}
    if taken:
        raise StackError(f"port(s) {sorted(taken)} given to more than one service")
    for name, port in ports.items():
        if not port_free(port):
            raise StackError(f"port {port} ({name}) is already in use on {HOST}: stop what holds it, "
                             f"pass --{name}-port N, or use --ports auto")
    return ports


def ray_temp_dir(state: Path) -> tuple[Path, bool]:
    """(folder, inside_state): Ray's temp dir, short enough for its Unix socket paths."""
    inside = state / "ray"
    if len(str(inside)) <= RAY_TEMP_MAX_LEN:
        inside.mkdir(parents=True, exist_ok=True)
        return inside, True
    return Path(tempfile.mkdtemp(prefix="gara-ray-")), False


def service_specs(state: Path, ports: dict[str, int], bucket: str, creds: dict[str, str],
                  args: argparse.Namespace, ray_tmp: Path) -> dict[str, dict[str, Any]]:
    """Command, environment and how to stop each server."""
    base = clean_env()
    s3_url = f"http://{HOST}:{ports['s3']}"
    prefect_url = f"http://{HOST}:{ports['prefect']}"
    s3_client_env = {**creds, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_url,
                     "MLFLOW_S3_ENDPOINT_URL": s3_url, "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}
    return {
        "s3": {
            "cmd": [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(ports["s3"])],
            "env": base, "stop": "group",
        },
        "mlflow": {
            "cmd": [executable("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]),
                    "--workers", "1", "--backend-store-uri", f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
                    "--artifacts-destination", f"s3://{bucket}/mlflow"],
            # No GenAI job runner: it forks eight more processes that this project never uses.
            "env": {**base, **s3_client_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, "stop": "group",
        },
        "prefect": {
            "cmd": [executable("prefect"), "server", "start", "--host", HOST, "--port", str(ports["prefect"]),
                    "--analytics-off"],
            "env": {**base, "PREFECT_HOME": str(state / "prefect"), "PREFECT_API_URL": f"{prefect_url}/api",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
            "stop": "group",
        },
        "ray": {
            "cmd": [executable("ray"), "start", "--head", "--block", "--node-ip-address", HOST,
                    "--port", str(ports["ray"]), "--include-dashboard", "false",
                    "--num-cpus", str(args.ray_cpus),
                    "--object-store-memory", str(args.ray_object_store_mb * 1024 * 1024),
                    "--temp-dir", str(ray_tmp), "--disable-usage-stats"],
            # Loopback only, no token (a token would have to reach every client); no 30 s
            # drain on SIGTERM, which only matters for Serve replicas on real clusters.
            "env": {**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"},
            "stop": "leader",
        },
    }


def client_env(ports: dict[str, int], creds: dict[str, str]) -> dict[str, str]:
    """What a shell needs to use the stack (env.sh); every name is in infra/contract.yaml."""
    s3_url = f"http://{HOST}:{ports['s3']}"
    return {
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_url,
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "GARA_S3_ENDPOINT_URL": s3_url,
        "PREFECT_API_URL": f"http://{HOST}:{ports['prefect']}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_ADDRESS": f"{HOST}:{ports['ray']}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "DVC_NO_ANALYTICS": "1",
    }


def write_env_file(path: Path, env: dict[str, str], state: Path) -> None:
    lines = [f"# The local stack in {state}: `source {path}`. Written by infra/local/stack.py up;",
             "# removed by `down`. The S3 keys are dummies for the in-memory moto server.",
             *(f"export {k}={shlex.quote(v)}" for k, v in env.items())]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def s3_ready(url: str, bucket: str, creds: dict[str, str]) -> Callable[[], bool]:
    """Healthy once the bucket MLflow writes to exists (created here on first answer)."""
    def check() -> bool:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                              config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5,
                                            request_checksum_calculation="when_required"))
        try:
            if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket=bucket)
            return True
        except (BotoCoreError, ClientError):
            return False
    return check


def ray_ready(address: str, log: Path, env: dict[str, str]) -> Callable[[], bool]:
    """Healthy once `ray status` lists an active node (it says "No cluster status" before)."""
    def check() -> bool:
        if b"Ray runtime started" not in log.read_bytes():
            return False  # each `ray status` costs seconds of CPU: only ask once it claims to be up
        try:
            out = subprocess.run([executable("ray"), "status", "--address", address], env=env,
                                 capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and re.search(r"Active:\s*\n\s*\d+ node_", out.stdout) is not None
    return check


def up(args: argparse.Namespace) -> int:
    contract = load_contract()
    state = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    (state / ".gitignore").write_text("*\n", encoding="utf-8")  # env.sh must never be committed
    with state_lock(state):
        old = read_manifest(state)
        if old is not None:
            alive = running_services(old)
            if alive:
                pids = ", ".join(f"{n} pid {p}" for n, p in alive.items())
                raise StackError(f"a stack is already running in {args.state_dir} ({pids}); stop it first: "
                                 f"python infra/local/stack.py down --state-dir {args.state_dir}")
            print(f"note: {args.state_dir}/{MANIFEST} was left by a stack that is no longer running; "
                  "replacing it")
            cleanup_files(state, old)
        if args.fresh:
            for sub in ("mlflow", "prefect", "ray", "logs"):
                shutil.rmtree(state / sub, ignore_errors=True)
        return start(args, contract, state)


def start(args: argparse.Namespace, contract: dict[str, Any], state: Path) -> int:
    ports = resolve_ports(args, contract)
    bucket = args.bucket
    creds = {"AWS_ACCESS_KEY_ID": "local" + secrets.token_hex(8),
             "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    for sub in ("logs", "mlflow", "prefect"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    ray_tmp, ray_tmp_inside = ray_temp_dir(state)
    specs = service_specs(state, ports, bucket, creds, args, ray_tmp)
    urls = {"s3": f"http://{HOST}:{ports['s3']}", "mlflow": f"http://{HOST}:{ports['mlflow']}",
            "prefect": f"http://{HOST}:{ports['prefect']}", "ray": f"{HOST}:{ports['ray']}"}
    health = {
        "s3": s3_ready(urls["s3"], bucket, creds),
        "mlflow": lambda: http_ok(f"{urls['mlflow']}/health"),
        "prefect": lambda: http_ok(f"{urls['prefect']}/api/health"),
        "ray": ray_ready(urls["ray"], state / "logs" / "ray.log", specs["ray"]["env"]),
    }
    manifest: dict[str, Any] = {
        "status": "starting", "state_dir": str(state), "bucket": bucket,
        "artifacts": f"s3://{bucket}/mlflow", "env_file": str(state / ENV_FILE),
        "ray_temp_dir": str(ray_tmp), "ray_temp_dir_owned": not ray_tmp_inside,
        "urls": {**urls, "prefect_api": f"{urls['prefect']}/api"},
        "ports": ports, "services": {},
    }
    t0 = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # a killed `up` still cleans up
    try:
        for name in SERVICES:
            spec = specs[name]
            log_path = state / "logs" / f"{name}.log"
            with log_path.open("wb") as log:
                # Own session: `down` can signal the server's whole process group, and a Ctrl-C
                # in the terminal that ran `up` does not reach the servers.
                proc = subprocess.Popen(spec["cmd"], env=spec["env"], cwd=state, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs[name] = proc
            manifest["services"][name] = {
                "pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
                "port": ports[name], "url": urls[name], "log": str(log_path), "stop": spec["stop"],
                "cmd": shlex.join(spec["cmd"]), "started_s": round(time.monotonic() - t0, 2),
            }
            write_json(state / MANIFEST, manifest)  # recorded at once: `down` can stop a half-started stack
        wait_healthy(procs, health, manifest, args.timeout, t0)
        env = client_env(ports, creds)
        write_env_file(state / ENV_FILE, env, state)
        manifest["status"] = "running"
        manifest["ready_s"] = round(time.monotonic() - t0, 2)
        write_json(state / MANIFEST, manifest)
    except BaseException:
        print("start-up failed: stopping what was started", file=sys.stderr)
        stop_services(manifest["services"])
        cleanup_files(state, manifest)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    print_summary(args.state_dir, manifest, env, contract)
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def wait_healthy(procs: dict[str, subprocess.Popen], health: dict[str, Callable[[], bool]],
                 manifest: dict[str, Any], timeout: float, t0: float) -> None:
    pending = list(procs)
    deadline = t0 + timeout
    while pending:
        for name in list(pending):
            rec = manifest["services"][name]
            code = procs[name].poll()
            if code is not None:
                raise StackError(f"{name} exited with code {code} while starting ({rec['cmd']}); "
                                 f"last lines of {rec['log']}:\n{tail(Path(rec['log']))}")
            if health[name]():
                rec["ready_s"] = round(time.monotonic() - t0, 2)
                pending.remove(name)
                print(f"  {name:<8} healthy after {rec['ready_s']:.1f} s", flush=True)
        if pending and time.monotonic() > deadline:
            details = "\n".join(f"{n}: {manifest['services'][n]['url']}, last lines of "
                                f"{manifest['services'][n]['log']}:\n{tail(Path(manifest['services'][n]['log']))}"
                                for n in pending)
            raise StackError(f"{', '.join(pending)} did not become healthy within {timeout:.0f} s\n{details}")
        if pending:
            time.sleep(0.3)


def print_summary(shown_state: Path, manifest: dict[str, Any], env: dict[str, str],
                  contract: dict[str, Any]) -> None:
    urls, svc = manifest["urls"], manifest["services"]
    notes = {
        "s3": f"moto, in memory (emptied at down); bucket {manifest['bucket']}",
        "mlflow": f"artifacts in {manifest['artifacts']}",
        "prefect": f"API {urls['prefect_api']}",
        "ray": "Ray head, no dashboard",
    }
    print(f"local stack up in {manifest['ready_s']:.1f} s (state: {shown_state})")
    for name in SERVICES:
        print(f"  {name:<8} {urls[name]:<26} {notes[name]:<53} pid {svc[name]['pid']}")
    secret = {name for name, spec in contract["env"].items() if spec.get("secret")}
    print(f"environment (`source {shown_state}/{ENV_FILE}`; secrets shown there only):")
    for key, value in env.items():
        print(f"  export {key}={'<in env.sh>' if key in secret else shlex.quote(value)}")
    print(f"stop: python infra/local/stack.py down --state-dir {shown_state}")


# --- stopping and status -----------------------------------------------------------------
def cleanup_files(state: Path, manifest: dict[str, Any]) -> None:
    for name in (MANIFEST, ENV_FILE):
        with contextlib.suppress(FileNotFoundError):
            (state / name).unlink()
    if manifest.get("ray_temp_dir_owned"):
        shutil.rmtree(manifest["ray_temp_dir"], ignore_errors=True)


def down(args: argparse.Namespace) -> int:
    state = args.state_dir.resolve()
    if not (state / MANIFEST).exists():
        print(f"nothing to stop: no stack recorded in {args.state_dir}")
        return 0
    with state_lock(state):
        manifest = read_manifest(state)
        if manifest is None:  # removed by another `down` since the check above
            print(f"nothing to stop: no stack recorded in {args.state_dir}")
            return 0
        took = stop_services(manifest["services"])
        for name in SERVICES:
            rec = manifest["services"].get(name)
            if rec is None:
                continue
            if took[name] is None:
                print(f"{name} (pid {rec['pid']}) was not running")
            else:
                print(f"stopped {name} (pid {rec['pid']}, port {rec['port']}) in {took[name]:.1f} s")
        cleanup_files(state, manifest)
    print(f"local stack in {args.state_dir} is down")
    return 0


def status(args: argparse.Namespace) -> int:
    state = args.state_dir.resolve()
    manifest = read_manifest(state)
    if manifest is None:
        print(json.dumps({"running": False}) if args.json else f"no stack recorded in {args.state_dir}")
        return 1
    checks = {
        "s3": lambda: http_ok(f"{manifest['urls']['s3']}/moto-api/"),
        "mlflow": lambda: http_ok(f"{manifest['urls']['mlflow']}/health"),
        "prefect": lambda: http_ok(f"{manifest['urls']['prefect']}/api/health"),
        "ray": lambda: not port_free(manifest["ports"]["ray"]),
    }
    report = {name: {"pid": rec["pid"], "running": recorded_process(rec) is not None,
                     "healthy": recorded_process(rec) is not None and checks[name](), "url": rec["url"]}
              for name, rec in manifest["services"].items()}
    ok = manifest.get("status") == "running" and all(r["healthy"] for r in report.values())
    if args.json:
        print(json.dumps({"running": ok, "manifest": manifest, "services": report}, indent=2))
    else:
        for name, r in report.items():
            word = "healthy" if r["healthy"] else ("running, not answering" if r["running"] else "stopped")
            print(f"  {name:<8} {r['url']:<26} pid {r['pid']:<8} {word}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("up", "start the stack and wait until every server is healthy"),
                           ("down", "stop exactly what `up` started (idempotent)"),
                           ("status", "show each recorded server and whether it answers")):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("--state-dir", type=Path, default=Path(".stack"),
                         help="where logs, databases, env.sh and stack.json live (default .stack)")
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="machine-readable output")
        if name != "up":
            continue
        cmd.add_argument("--ports", choices=("default", "auto"), default="default",
                         help="default: S3 9000, MLflow 5000, Prefect 4200, Ray 6379; auto: free ports")
        for svc in SERVICES:
            cmd.add_argument(f"--{svc}-port", type=int, default=None,
                             help=f"port for {svc} (overrides --ports)")
        cmd.add_argument("--bucket", default=DEFAULT_BUCKET, help="S3 bucket created for MLflow's artifacts")
        cmd.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1, help="CPUs the Ray head offers")
        cmd.add_argument("--ray-object-store-mb", type=int, default=256, help="Ray object store size")
        cmd.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every server")
        cmd.add_argument("--fresh", action="store_true", help="delete the MLflow and Prefect databases first")
    args = parser.parse_args(argv)
    try:
        return {"up": up, "down": down, "status": status}[args.command](args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

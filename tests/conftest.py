"""Shared fixtures. Every server a test starts binds to 127.0.0.1 and is stopped by the test."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Keep everything on loopback and quiet, whatever the caller's environment says.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 / DVC / MLflow at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server (moto, in memory) on 127.0.0.1, for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(f"http://127.0.0.1:{port}", "testing-key", "testing-secret")
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this test's process environment at the local S3 server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store migrated once per session; servers start on copies of it (migrating a
    fresh DB costs ~10 s, copying it milliseconds)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = tmp_path_factory.mktemp("mlflow-template")
    SqlAlchemyStore(f"sqlite:///{root}/mlflow.db", str(root / "unused-artifacts")).engine.dispose()
    return root / "mlflow.db"


@contextlib.contextmanager
def running_mlflow_server(
    root: Path, template: Path, artifacts_destination: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over a copy of ``template``, proxying artifacts to
    ``artifacts_destination`` (a folder or s3:// URL); yields its URL and stops it after."""
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, root / "mlflow.db")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", artifacts_destination,
    ]
    log_path = root / "server.log"
    log = log_path.open("wb")
    # Own process group: stopping it also stops the uvicorn worker it spawns, and nothing else.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server on {url} did not answer /health within 90 s")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store, proxied artifacts on disk) for the
    session; tests keep apart by using their own experiment names. Yields the tracking URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(root, mlflow_db_template, str(root / "artifacts")) as url:
        yield url


@pytest.fixture(scope="module")
def mlflow_s3_server(
    tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path, s3_server: S3Server
) -> Iterator[tuple[str, str]]:
    """A real ``mlflow server`` whose artifacts live in a bucket of the local S3 server (the
    server holds the S3 credentials; clients go through its proxy). Yields (URL, bucket)."""
    bucket = s3_server.new_bucket()
    env = {**s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url}
    root = tmp_path_factory.mktemp("mlflow-s3-server")
    with running_mlflow_server(root, mlflow_db_template, f"s3://{bucket}/mlflow", env) as url:
        yield url, bucket


@dataclass
class BaseCheckpoint:
    path: Path
    sha256: str
    state: dict


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> BaseCheckpoint:
    """A seeded vit_tiny state dict saved as a real checkpoint file (adapters reference it)."""
    import hashlib

    import torch

    from gara.models.backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_tiny", pretrained=False).model
    path = tmp_path_factory.mktemp("base") / "sam_vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return BaseCheckpoint(path, hashlib.sha256(path.read_bytes()).hexdigest(), model.state_dict())

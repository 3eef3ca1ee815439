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

from gara.allocator import keep_freed_memory

keep_freed_memory()  # as the CLI and the Ray workers do: model forwards without page-fault storms

# Keep everything on loopback and quiet, whatever the caller's environment says.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")


# The longest modules, longest first (``--durations``, one process, fresh clone of 413daaa:
# flows ~8 min, the end-to-end run ~7, Ray training ~4). `make test` deals whole modules to its workers in
# collection order (xdist --dist loadfile); starting these first keeps one worker from being
# left with a long module at the end.
LONGEST_MODULES = ("test_flows.py", "test_pipeline_e2e.py", "test_train.py", "test_registry.py",
                   "test_serving.py", "test_ray_stages.py", "test_demo.py", "test_sam21.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)  # stable: each module keeps its own order


def write_dataset(root: Path, pictures: list, category: str = "rect") -> Path:
    """A dataset folder in the project's format from (RGB image, [bool masks]) pairs: images/{i}.png
    (ids from 1) and annotations.json with each mask as RLE."""
    import cv2

    from gara.data.coco import mask_bbox, mask_to_rle, write_coco

    images, anns = [], []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, (image, masks) in enumerate(pictures, start=1):
        for mask in masks:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "segmentation": mask_to_rle(mask), "bbox": mask_bbox(mask),
                         "area": float(mask.sum())})
        height, width = image.shape[:2]
        cv2.imwrite(str(root / f"images/{i}.png"), image[..., ::-1])
        images.append({"id": i, "file_name": f"images/{i}.png", "height": height, "width": width})
    write_coco(root, {"images": images, "annotations": anns, "categories": [{"id": 1, "name": category}]})
    return root


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


BASES_BUCKET = "published-bases"  # where a team publishes base checkpoints for its pullers


def publish_base(s3: S3Server, base: Path) -> str:
    """Upload a base checkpoint as a team would for its pullers; returns its s3:// URL
    (registered versions name their base by it: ``registry.base_uri``)."""
    client = s3.client()
    if BASES_BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BASES_BUCKET)
    client.upload_file(str(base), BASES_BUCKET, base.name)
    return f"s3://{BASES_BUCKET}/{base.name}"


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
def running_server(cmd: list[str], health_url: str, log_path: Path, env: dict[str, str] | None = None,
                   timeout: float = 120) -> Iterator[None]:
    """Start ``cmd`` in its own process group, wait until ``health_url`` answers 200, and stop
    the whole group (the server and any worker it spawned, nothing else) afterwards."""
    import signal
    import subprocess
    import time
    import urllib.request

    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}): "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{health_url} did not answer within {timeout:.0f} s (log: {log_path})")
            time.sleep(0.5)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()


@contextlib.contextmanager
def running_mlflow_server(
    root: Path, template: Path, artifacts_destination: str, env: dict[str, str] | None = None,
    proxy_artifacts: bool = True,
) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over a copy of ``template``; yields its URL, stops it after.

    Artifacts go to ``artifacts_destination`` (a folder or s3:// URL) through the server's proxy,
    or, with ``proxy_artifacts=False``, straight from each client (which then needs the store's
    credentials and MLFLOW_S3_ENDPOINT_URL)."""
    import shutil
    import sys

    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, root / "mlflow.db")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        *(["--artifacts-destination", artifacts_destination] if proxy_artifacts else
          ["--default-artifact-root", artifacts_destination, "--no-serve-artifacts"]),
    ]
    # As infra/local/stack.py starts it: without MLflow's GenAI job runner (8 processes, seconds
    # of CPU at every start, for features this project does not use).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    with running_server(cmd, f"{url}/health", root / "server.log", env, timeout=90):
        yield url


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


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real ``prefect server`` on 127.0.0.1 (its own PREFECT_HOME; scheduler on). Yields the
    environment a client needs (PREFECT_API_URL, PREFECT_HOME)."""
    import sys

    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]
    with running_server(cmd, f"{env['PREFECT_API_URL']}/health", root / "server.log", env):
        yield env


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

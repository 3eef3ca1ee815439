"""DVC versioning of datasets, with the real DVC CLI: a team S3 remote (a real S3-compatible
server on 127.0.0.1) and the project's read-only in-repo store for the embedded sample."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gara.data.sample import build_sample
from gara.data.validate import validate_dataset

REPO = Path(__file__).resolve().parents[1]
# What a clone of the project holds for DVC: the .dvc file, config, ignore files, the store.
TRACKED_DVC_FILES = ("data.dvc", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore")
STORE = ".dvc-store"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"DVC_NO_ANALYTICS": "1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"})
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"{cmd} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dvc(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, env)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_clone(src: Path, dest: Path, names: tuple[str, ...]) -> Path:
    """What ``git clone`` would give: the tracked files only, in a fresh git repo."""
    dest.mkdir()
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (src / name).is_dir():
            shutil.copytree(src / name, target)
        else:
            shutil.copy2(src / name, target)
    run(["git", "init", "-q"], dest)
    return dest


def test_push_to_s3_and_pull_in_fresh_clone(tmp_path: Path, s3_server) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    dvc("init", "-q", cwd=repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    build_sample(repo / "data", seed=0, train_size=3, val_size=2, unlabelled_crops=1)
    original = _digests(repo / "data")
    dvc("add", "-q", "data", cwd=repo)

    bucket = s3_server.new_bucket()
    dvc("remote", "add", "-d", "team", f"s3://{bucket}/dvc", cwd=repo)
    dvc("remote", "modify", "team", "endpointurl", s3_server.endpoint_url, cwd=repo)
    creds = _env({"AWS_ACCESS_KEY_ID": s3_server.access_key,
                  "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                  "AWS_DEFAULT_REGION": s3_server.region})
    dvc("push", cwd=repo, env=creds)

    # The objects are in the bucket, and no credential reached the committed config.
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="dvc/")
    assert listing.get("KeyCount", 0) == len(original) + 1  # + the .dir manifest
    config = (repo / ".dvc" / "config").read_text()
    assert s3_server.secret_key not in config and s3_server.access_key not in config

    clone = _copy_clone(repo, tmp_path / "clone",
                        ("data.dvc", ".dvc/config", ".dvc/.gitignore", ".dvcignore"))
    dvc("pull", cwd=clone, env=creds)
    assert _digests(clone / "data") == original
    assert "up to date" in dvc("status", cwd=clone, env=creds)
    assert validate_dataset(clone / "data" / "train") == []


def test_in_repo_store_restores_sample(tmp_path: Path) -> None:
    missing = [n for n in (*TRACKED_DVC_FILES, STORE) if not (REPO / n).exists()]
    if missing:
        pytest.skip(f"project DVC files not present ({', '.join(missing)}); "
                    "see docs/DATA.md to set up the embedded sample")
    clone = _copy_clone(REPO, tmp_path / "clone", (*TRACKED_DVC_FILES, STORE))
    # No credentials and no network: the default remote is the in-repo folder.
    dvc("pull", cwd=clone)
    assert "up to date" in dvc("status", cwd=clone)
    for split in ("train", "val"):
        assert validate_dataset(clone / "data" / split) == [], split
    if (REPO / "data").is_dir():
        assert _digests(clone / "data") == _digests(REPO / "data")

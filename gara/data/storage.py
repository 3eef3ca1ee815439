"""Where a dataset's files live: a local folder or an ``s3://BUCKET/PREFIX``, behind one interface.

``gara corrupt`` reads its input and writes its output through a store, so the same code runs
in one process, in a process pool, or in Ray workers on machines that share no disk (with an
``s3://`` dataset). A store is a small picklable value (its S3 client is made per process).

Names inside a store are relative POSIX paths (``images/a.png``); an absolute name, one with
``..`` or, locally, a symlink that leads out of the folder is refused, naming the dataset and the
name, so nothing is read or written outside it.
Writes are atomic: a local file is renamed into place, an S3 object appears whole.
Credentials come from the environment (boto3's chain) only.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlparse

from gara.fsutil import atomic_write_bytes

S3_ENDPOINT_ENV = "GARA_S3_ENDPOINT_URL"


class UnsafePathError(ValueError):
    """A name in a dataset points outside it (absolute, or through ``..``)."""


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client. Credentials come from the environment (or boto3's usual chain) only.

    The endpoint is, in order: the argument, GARA_S3_ENDPOINT_URL, boto3's own
    AWS_ENDPOINT_URL handling (for S3-compatible stores such as a local test server).
    """
    import boto3

    endpoint_url = endpoint_url or os.environ.get(S3_ENDPOINT_ENV) or None
    return boto3.client("s3", endpoint_url=endpoint_url)


@functools.cache
def _client():
    return s3_client()  # one per process: clients are not picklable, and cost ~50 ms


def relative_name(name: str, where: str) -> str:
    """``name`` as a clean relative POSIX path inside the dataset, or UnsafePathError."""
    path = PurePosixPath(name.replace("\\", "/"))
    if not name or path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"{where}: file name {name!r} points outside the dataset; "
                              "names must be relative to the dataset folder, without '..'")
    return str(path)


def inside(root: Path, name: str) -> Path:
    """``root / name`` for a name inside the dataset folder, or UnsafePathError: the name must be
    relative without '..' and, followed through any symlinks, still end inside the folder."""
    path = root / relative_name(name, str(root))
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise UnsafePathError(f"{root}: file name {name!r} is a link to {real}, outside the dataset "
                              "folder; copy the file in instead")
    return path


class DatasetStore(Protocol):
    def describe(self, name: str = "") -> str: ...
    def read_bytes(self, name: str) -> bytes: ...
    def read_optional(self, name: str) -> bytes | None: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> bool: ...
    def first_name(self, under: str = "") -> str | None: ...


@dataclass(frozen=True)
class LocalStore:
    root: Path

    def _path(self, name: str) -> Path:
        return inside(self.root, name)

    def describe(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def read_bytes(self, name: str) -> bytes:
        path = self._path(name)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise FileNotFoundError(f"{path}: cannot read ({exc.strerror})") from exc

    def read_optional(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except OSError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self._path(name), data)

    def delete(self, name: str) -> bool:
        path = self._path(name)
        if not path.is_file():
            return False
        path.unlink()
        return True

    def first_name(self, under: str = "") -> str | None:
        """The first entry (sorted) in the folder, or in its sub-folder ``under``; None if empty."""
        folder = self._path(under) if under else self.root
        entry = next(iter(sorted(folder.iterdir())), None) if folder.is_dir() else None
        return None if entry is None else entry.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class S3Store:
    bucket: str
    prefix: str  # no leading or trailing slash; "" = the bucket's root

    def _key(self, name: str) -> str:
        name = relative_name(name, self.describe())
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self, name: str = "") -> str:
        root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{root}/{name}" if name else root

    def _call(self, name: str, operation: str) -> dict | None:
        """One S3 call on ``name``'s key; None when there is no such object, OSError otherwise."""
        from botocore.exceptions import ClientError

        try:
            return getattr(_client(), operation)(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise OSError(f"{self.describe(name)}: {exc}") from exc

    def _get(self, name: str) -> bytes | None:
        response = self._call(name, "get_object")
        return None if response is None else response["Body"].read()

    def read_bytes(self, name: str) -> bytes:
        data = self._get(name)
        if data is None:
            raise FileNotFoundError(f"{self.describe(name)}: no such object")
        return data

    def read_optional(self, name: str) -> bytes | None:
        return self._get(name)

    def write_bytes(self, name: str, data: bytes) -> None:
        _client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def delete(self, name: str) -> bool:
        if self._call(name, "head_object") is None:
            return False
        self._call(name, "delete_object")
        return True

    def first_name(self, under: str = "") -> str | None:
        """The name of one object under the prefix (or its ``under``/), None if there is none."""
        from botocore.exceptions import ClientError

        prefix = f"{self._key(under)}/" if under else (f"{self.prefix}/" if self.prefix else "")
        try:
            listed = _client().list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        except ClientError as exc:
            raise OSError(f"{self.describe(under)}: {exc}") from exc
        keys = [item["Key"] for item in listed.get("Contents", [])]
        return keys[0][len(self.prefix) + 1 if self.prefix else 0:] if keys else None


def open_store(location: str | Path) -> LocalStore | S3Store:
    """A dataset location (a folder, or ``s3://BUCKET[/PREFIX]``; the endpoint as for every S3
    client, :func:`s3_client`) -> its store."""
    text = str(location)
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise ValueError(f"dataset URL {text!r}: expected s3://BUCKET/PREFIX")
        return S3Store(parsed.netloc, parsed.path.strip("/"))
    if "://" in text:
        raise ValueError(f"dataset location {text!r}: a folder or an s3://BUCKET/PREFIX URL")
    return LocalStore(Path(location).absolute())  # absolute: workers may run elsewhere


def within(out: LocalStore | S3Store, data: LocalStore | S3Store) -> bool:
    """Whether ``out`` is ``data`` or lies inside it (a later read of ``data`` would take in what
    was written to ``out``)."""
    if isinstance(out, LocalStore) and isinstance(data, LocalStore):
        inner, outer = out.root.resolve(), data.root.resolve()
        return inner == outer or outer in inner.parents
    inner_text, outer_text = out.describe(), data.describe()
    return inner_text == outer_text or inner_text.startswith(outer_text + "/")

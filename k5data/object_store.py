"""Object stores of the project (local directory, S3): every read and write of datasets, shards, exports and reports
goes through one of these (curation output, latent shards and their loader, generated media, the Dagster
``ObjectStoreResource`` in ``orchestration.resources``). ``open_store(uri)`` picks one from a path, ``file://`` or
``s3://bucket/prefix`` URI. Keys are relative POSIX paths; a prefix is a plain string prefix of keys, as in S3."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol
from urllib.parse import unquote, urlparse


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size in bytes and a version that changes when its content does (mtime_ns for
    local files, the ETag for S3)."""

    key: str
    size: int
    version: str


class ObjectStore(Protocol):
    """What callers may rely on; ``LocalStore`` and ``S3Store`` implement it."""

    def put_file(self, local: Path, key: str) -> str: ...
    def get_file(self, key: str, local: Path) -> Path: ...
    def put_bytes(self, key: str, data: bytes) -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open_read(self, key: str) -> IO[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def list_info(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def uri(self, key: str) -> str: ...
    def child(self, prefix: str) -> ObjectStore: ...
    @property
    def location(self) -> str: ...


def key_order(key: str) -> tuple[str, ...]:
    """Sort key of object keys: path component by component (``a/x`` before ``a-b/x``), as a folder walk lists."""
    return PurePosixPath(key).parts


def _need_prefix(prefix: str) -> str:
    if not prefix.strip("/"):
        raise ValueError("delete_prefix needs a non-empty prefix; refusing to empty the whole store")
    return prefix


@dataclass
class LocalStore:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def location(self) -> str:
        """The folder, as ``open_store`` accepts it back."""
        return str(self.root)

    def child(self, prefix: str) -> LocalStore:
        """The store of keys under ``prefix/`` (keys relative to it)."""
        return LocalStore(self.root / prefix.strip("/"))

    def _write_atomic(self, key: str, write: Any) -> str:
        dst = self.root / key
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        write(tmp)
        os.replace(tmp, dst)  # why: atomic rename, a crash never leaves a half-written key
        return self.uri(key)

    def put_file(self, local: Path, key: str) -> str:
        """Copy ``local`` to ``key``; returns the object's URI."""
        return self._write_atomic(key, lambda tmp: shutil.copyfile(local, tmp))

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` to ``key``; returns the object's URI."""
        return self._write_atomic(key, lambda tmp: tmp.write_bytes(data))

    def get_file(self, key: str, local: Path) -> Path:
        """Copy object ``key`` to the local path ``local``; returns it."""
        src = self.root / key
        if not src.is_file():
            raise FileNotFoundError(f"object {key!r} not found at {src}")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local)
        return Path(local)

    def get_bytes(self, key: str) -> bytes:
        """The bytes of object ``key``."""
        src = self.root / key
        if not src.is_file():
            raise FileNotFoundError(f"object {key!r} not found at {src}")
        return src.read_bytes()

    def uri(self, key: str) -> str:
        return (self.root / key).resolve().as_uri()

    def open_read(self, key: str) -> IO[bytes]:
        return open(self.root / key, "rb")

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def _files(self, prefix: str) -> list[Path]:
        # why: walk only the folder the prefix names, not the whole store
        base = self.root / prefix[:prefix.rfind("/") + 1] if "/" in prefix else self.root
        return [p for p in base.rglob("*") if p.is_file() and p.relative_to(self.root).as_posix().startswith(prefix)]

    def list(self, prefix: str = "") -> list[str]:
        out = [p.relative_to(self.root).as_posix() for p in self._files(prefix)]
        return sorted(k for k in out if not k.endswith(".partial"))

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Keys under ``prefix`` with size and mtime_ns, in ``key_order``."""
        out = []
        for key in sorted(self.list(prefix), key=key_order):
            st = (self.root / key).stat()
            out.append(ObjectInfo(key, st.st_size, str(st.st_mtime_ns)))
        return out

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix`` (and leftover ``.partial`` files), then the folders
        this empties; returns the number of objects deleted."""
        deleted = 0
        for path in self._files(_need_prefix(prefix)):
            path.unlink()
            deleted += not path.name.endswith(".partial")
            for parent in path.parents:
                if parent == self.root or not parent.is_relative_to(self.root) or any(parent.iterdir()):
                    break
                parent.rmdir()
        return deleted


@dataclass
class S3Store:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    multipart_threshold: int = 8 * 1024 * 1024
    region: str = "us-east-1"
    client: Any = field(default=None, repr=False, compare=False)  # shared by child stores; built when None

    def __post_init__(self) -> None:
        from boto3.s3.transfer import TransferConfig

        from k5data.sources import s3_client

        # one client recipe for the project: path-style addressing (any S3-compatible store) and retries
        self._s3: Any = self.client if self.client is not None else s3_client(self.endpoint_url, self.region)
        self.client = self._s3
        self._cfg = TransferConfig(multipart_threshold=self.multipart_threshold,
                                   multipart_chunksize=max(self.multipart_threshold, 5 * 1024 * 1024))

    @property
    def location(self) -> str:
        """``s3://bucket/prefix``, as ``open_store`` accepts it back."""
        return f"s3://{self.bucket}/{self.prefix.strip('/')}".rstrip("/")

    def child(self, prefix: str) -> S3Store:
        """The store of keys under ``prefix/`` (keys relative to it), on the same client."""
        return S3Store(self.bucket, self._k(prefix.strip("/")), self.endpoint_url, self.multipart_threshold,
                       self.region, self._s3)

    def _k(self, key: str) -> str:
        return f"{self.prefix.rstrip('/')}/{key}" if self.prefix else key

    def put_file(self, local: Path, key: str) -> str:
        """Upload ``local`` to ``key``; returns the object's ``s3://`` URI."""
        # why: S3 objects only become visible once the (multipart) upload completes; SHA256 checksums per part
        self._s3.upload_file(str(local), self.bucket, self._k(key), Config=self._cfg,
                             ExtraArgs={"ChecksumAlgorithm": "SHA256"})
        return self.uri(key)

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` to ``key`` in one PUT (visible whole or not at all); returns the object's URI."""
        self._s3.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, ChecksumAlgorithm="SHA256")
        return self.uri(key)

    def get_file(self, key: str, local: Path) -> Path:
        """Download object ``key`` to the local path ``local``; returns it."""
        if not self.exists(key):
            raise FileNotFoundError(f"object {key!r} not found in {self.uri(key)}")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._s3.download_file(self.bucket, self._k(key), str(local))
        return Path(local)

    def get_bytes(self, key: str) -> bytes:
        """The bytes of object ``key``."""
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self._s3.exceptions.NoSuchKey:
            raise FileNotFoundError(f"object {key!r} not found in {self.uri(key)}") from None

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    def open_read(self, key: str) -> IO[bytes]:
        return self._s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]

    def exists(self, key: str) -> bool:
        r = self._s3.list_objects_v2(Bucket=self.bucket, Prefix=self._k(key))
        return any(o["Key"] == self._k(key) for o in r.get("Contents", []))

    def _listed(self, prefix: str) -> list[dict[str, Any]]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix))
        return [o for page in pages for o in page.get("Contents", [])]

    def list(self, prefix: str = "") -> list[str]:
        strip = len(self._k(""))
        return sorted(o["Key"][strip:] for o in self._listed(prefix))

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Keys under ``prefix`` with size and ETag, in S3's listing order (by key); "folder" markers skipped."""
        strip = len(self._k(""))
        return [ObjectInfo(o["Key"][strip:], int(o["Size"]), o["ETag"].strip('"'))
                for o in self._listed(prefix) if not o["Key"].endswith("/")]

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; returns how many were deleted."""
        keys = [o["Key"] for o in self._listed(_need_prefix(prefix))]
        for start in range(0, len(keys), 1000):  # why: DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            errors = self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}).get("Errors")
            if errors:
                raise OSError(f"could not delete {len(errors)} objects under {self.uri(prefix)}: {errors[:3]}")
        return len(keys)


def open_store(uri: str | os.PathLike, endpoint_url: str | None = None, *, region: str | None = None,
               create: bool = True) -> LocalStore | S3Store:
    """A store from a folder path, ``file://`` URI or ``s3://bucket[/prefix]`` (any S3-compatible endpoint:
    ``endpoint_url``, else ``$K5_S3_ENDPOINT_URL``; ``region`` default us-east-1). Local folders are created unless
    ``create`` is False (readers: a missing folder lists as empty)."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"object store URI {text!r} has no bucket; use s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path.strip("/"),
                       endpoint_url=endpoint_url or os.environ.get("K5_S3_ENDPOINT_URL") or None,
                       region=region or "us-east-1")
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # one letter: a Windows drive
        root = Path(unquote(parsed.path) if parsed.scheme == "file" else text).expanduser().resolve()
        if create:
            root.mkdir(parents=True, exist_ok=True)
        return LocalStore(root)
    raise ValueError(f"object store URI {text!r}: scheme {parsed.scheme!r} is not supported; "
                     "use a folder path, file:// or s3://bucket/prefix")

"""Object stores of the project (local directory, S3): the latent shard writer and loader, and the Dagster
``ObjectStoreResource`` (``orchestration.resources``) all use these. ``open_store(uri)`` picks one from a path,
``file://`` or ``s3://bucket/prefix`` URI. Keys are relative POSIX paths."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse


@dataclass
class LocalStore:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def put_file(self, local: Path, key: str) -> str:
        """Copy ``local`` to ``key``; returns the object's URI."""
        dst = self.root / key
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)  # why: atomic rename, a crash never leaves a half-written key
        return self.uri(key)

    def get_file(self, key: str, local: Path) -> Path:
        """Copy object ``key`` to the local path ``local``; returns it."""
        src = self.root / key
        if not src.is_file():
            raise FileNotFoundError(f"object {key!r} not found at {src}")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local)
        return Path(local)

    def uri(self, key: str) -> str:
        return (self.root / key).resolve().as_uri()

    def open_read(self, key: str) -> IO[bytes]:
        return open(self.root / key, "rb")

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root
        out = [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(k for k in out if k.startswith(prefix) and not k.endswith(".partial"))


@dataclass
class S3Store:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    multipart_threshold: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        from boto3.s3.transfer import TransferConfig

        from k5data.sources import s3_client

        # one client recipe for the project: path-style addressing (any S3-compatible store) and retries
        self._s3: Any = s3_client(self.endpoint_url)
        self._cfg = TransferConfig(multipart_threshold=self.multipart_threshold,
                                   multipart_chunksize=max(self.multipart_threshold, 5 * 1024 * 1024))

    def _k(self, key: str) -> str:
        return f"{self.prefix.rstrip('/')}/{key}" if self.prefix else key

    def put_file(self, local: Path, key: str) -> str:
        """Upload ``local`` to ``key``; returns the object's ``s3://`` URI."""
        # why: S3 objects only become visible once the (multipart) upload completes; SHA256 checksums per part
        self._s3.upload_file(str(local), self.bucket, self._k(key), Config=self._cfg,
                             ExtraArgs={"ChecksumAlgorithm": "SHA256"})
        return self.uri(key)

    def get_file(self, key: str, local: Path) -> Path:
        """Download object ``key`` to the local path ``local``; returns it."""
        if not self.exists(key):
            raise FileNotFoundError(f"object {key!r} not found in {self.uri(key)}")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._s3.download_file(self.bucket, self._k(key), str(local))
        return Path(local)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    def open_read(self, key: str) -> IO[bytes]:
        return self._s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]

    def exists(self, key: str) -> bool:
        r = self._s3.list_objects_v2(Bucket=self.bucket, Prefix=self._k(key))
        return any(o["Key"] == self._k(key) for o in r.get("Contents", []))

    def list(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        strip = len(self._k(""))
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
            out += [o["Key"][strip:] for o in page.get("Contents", [])]
        return sorted(out)


def open_store(uri: str | os.PathLike, endpoint_url: str | None = None) -> LocalStore | S3Store:
    """A store from a folder path, ``file://`` URI or ``s3://bucket[/prefix]`` (any S3-compatible endpoint:
    ``endpoint_url``, else ``$K5_S3_ENDPOINT_URL``). Local folders are created."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"object store URI {text!r} has no bucket; use s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path.strip("/"),
                       endpoint_url=endpoint_url or os.environ.get("K5_S3_ENDPOINT_URL") or None)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # one letter: a Windows drive
        root = Path(unquote(parsed.path) if parsed.scheme == "file" else text).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return LocalStore(root)
    raise ValueError(f"object store URI {text!r}: scheme {parsed.scheme!r} is not supported; "
                     "use a folder path, file:// or s3://bucket/prefix")

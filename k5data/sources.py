"""Listing and reading raw media from a local folder or an S3 prefix (any S3-compatible store via endpoint_url)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from k5data.object_store import ObjectStore, RetryPolicy


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def s3_client(endpoint_url: str | None = None, region: str = "us-east-1", *, retry: RetryPolicy | None = None) -> Any:
    """The project's S3 client: path-style addressing (works with every S3-compatible store: MinIO, moto, Ceph, AWS),
    botocore's retries in the policy's mode and its connect/read timeouts."""
    import boto3
    from botocore.config import Config

    from k5data.object_store import RetryPolicy

    policy = retry or RetryPolicy()
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=Config(
        s3={"addressing_style": "path"},
        retries={"mode": policy.botocore_mode, "total_max_attempts": max(1, policy.botocore_attempts)},
        connect_timeout=policy.connect_timeout_s, read_timeout=policy.read_timeout_s))


def source_name(src: str) -> str:
    """Partition name of a source: the last path component of the folder or prefix (bucket name if none)."""
    if is_s3(src):
        bucket, key = split_s3(src)
        return PurePosixPath(key).name or bucket
    return Path(src).resolve().name


def shard_of(key: str, shards: int) -> int:
    """Stable shard of an object key (crc32, identical on every machine and run)."""
    return zlib.crc32(key.encode()) % max(1, shards)


@dataclass(frozen=True)
class SourceObject:
    uri: str        # file:///abs/path or s3://bucket/key
    key: str        # path relative to the source root, '/'-separated
    size: int
    version: str    # mtime_ns for files, ETag for S3: a change means "re-register"


class Source:
    """A folder or S3 prefix of raw media; ``iter_objects`` lists, ``read_bytes``/``local_path`` fetch. Reads go
    through the object store of the root (``k5data.object_store``)."""

    def __init__(self, root: str, endpoint_url: str | None = None, region: str = "us-east-1", *,
                 retry: RetryPolicy | None = None) -> None:
        self.root = str(root)
        self.name = source_name(self.root)
        self._endpoint_url = endpoint_url
        self._region = region
        self._retry = retry
        self._store: ObjectStore | None = None

    @property
    def store(self) -> ObjectStore:
        if self._store is None:  # why: on first use, so naming a source builds no S3 client
            from k5data.object_store import open_store

            root = self.root if is_s3(self.root) else str(Path(self.root).resolve())
            self._store = open_store(root, self._endpoint_url, region=self._region, create=False, retry=self._retry)
        return self._store

    def iter_objects(self) -> Iterator[SourceObject]:
        if not is_s3(self.root) and not Path(self.root).resolve().is_dir():
            raise FileNotFoundError(f"source folder {Path(self.root).resolve()} does not exist")
        for info in self.store.list_info(""):
            if is_s3(self.root):
                yield SourceObject(self.store.uri(info.key), info.key, info.size, info.version)
            elif not PurePosixPath(info.key).name.startswith("."):  # hidden files (.DS_Store, swap files): not media
                # why: the path as listed, not symlink-resolved, so a re-run sees the same URIs as before
                yield SourceObject((Path(self.store.location) / info.key).as_uri(), info.key, info.size, info.version)

    def external_target(self, key: str) -> Path | None:
        """For a local source: where ``key`` really points when a symlink (of the file or of a folder on its way)
        leads outside the source folder, else None. S3 keys have no links."""
        if is_s3(self.root):
            return None
        root = Path(self.root).resolve()
        target = (root / key).resolve()
        return None if target.is_relative_to(root) else target

    def read_bytes(self, obj_or_key: SourceObject | str) -> bytes:
        return self.store.get_bytes(obj_or_key.key if isinstance(obj_or_key, SourceObject) else obj_or_key)

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    def local_path(self, obj: SourceObject, cache_dir: str | os.PathLike) -> tuple[Path, bool]:
        """A local file with the object's bytes; returns (path, is_temporary). Local sources are used in place."""
        if not is_s3(self.root):
            return Path(self.root).resolve() / obj.key, False
        dest = Path(cache_dir) / f"{zlib.crc32(obj.uri.encode()):08x}{PurePosixPath(obj.key).suffix}"
        return self.store.get_file(obj.key, dest), True  # streamed to disk: videos can be large

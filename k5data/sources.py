"""Listing and reading raw media from a local folder or an S3 prefix (any S3-compatible store via endpoint_url)."""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def s3_client(endpoint_url: str | None = None, region: str = "us-east-1") -> Any:
    import boto3

    # Path-style addressing works with every S3-compatible store (MinIO, moto, Ceph) as well as AWS.
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))


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
    """A folder or S3 prefix of raw media; ``iter_objects`` lists, ``read_bytes``/``local_path`` fetch."""

    def __init__(self, root: str, endpoint_url: str | None = None, region: str = "us-east-1") -> None:
        self.root = str(root)
        self.name = source_name(self.root)
        self._endpoint_url = endpoint_url
        self._region = region
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self._endpoint_url, self._region)
        return self._client

    def iter_objects(self) -> Iterator[SourceObject]:
        if is_s3(self.root):
            bucket, prefix = split_s3(self.root)
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) + 1 if prefix else 0:]
                    if rel and not rel.endswith("/"):
                        yield SourceObject(f"s3://{bucket}/{obj['Key']}", rel, int(obj["Size"]), obj["ETag"].strip('"'))
            return
        root = Path(self.root).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"source folder {root} does not exist")
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                st = path.stat()
                yield SourceObject(path.as_uri(), path.relative_to(root).as_posix(), st.st_size, str(st.st_mtime_ns))

    def read_bytes(self, obj_or_key: SourceObject | str) -> bytes:
        key = obj_or_key.key if isinstance(obj_or_key, SourceObject) else obj_or_key
        if is_s3(self.root):
            bucket, prefix = split_s3(self.root)
            full = f"{prefix}/{key}" if prefix else key
            return self.client.get_object(Bucket=bucket, Key=full)["Body"].read()
        return (Path(self.root).resolve() / key).read_bytes()

    def exists(self, key: str) -> bool:
        if is_s3(self.root):
            bucket, prefix = split_s3(self.root)
            full = f"{prefix}/{key}" if prefix else key
            try:
                self.client.head_object(Bucket=bucket, Key=full)
                return True
            except self.client.exceptions.ClientError:
                return False
        return (Path(self.root).resolve() / key).is_file()

    def local_path(self, obj: SourceObject, cache_dir: str | os.PathLike) -> tuple[Path, bool]:
        """A local file with the object's bytes; returns (path, is_temporary). Local sources are used in place."""
        if not is_s3(self.root):
            return Path(self.root).resolve() / obj.key, False
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        dest = cache / f"{zlib.crc32(obj.uri.encode()):08x}{PurePosixPath(obj.key).suffix}"
        bucket, key = split_s3(obj.uri)
        body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
        with open(dest, "wb") as fh:  # streamed: videos can be large
            shutil.copyfileobj(body, fh, 1 << 20)
        return dest, True

"""Object stores of the project (local directory, S3): every read and write of datasets, shards, exports and reports
goes through one of these (curation output, latent shards and their loader, generated media, the Dagster
``ObjectStoreResource`` in ``orchestration.resources``). ``open_store(uri)`` picks one from a path, ``file://`` or
``s3://bucket/prefix`` URI. Keys are relative POSIX paths; a prefix is a plain string prefix of keys, as in S3."""
from __future__ import annotations

import errno
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

T = TypeVar("T")

# S3 error codes that mean "try again" (throttling, server trouble, clock/transport hiccups), as botocore's
# standard retry mode treats them, plus access errors: a permission fixed later must not turn files into rejects.
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
                   "TooManyRequestsException", "RequestLimitExceeded", "ProvisionedThroughputExceededException",
                   "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                   "PriorRequestNotComplete", "BandwidthLimitExceeded", "EC2ThrottledException",
                   "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                   "TokenRefreshRequired"}
# OS errors a person or a retry can fix (permissions, full disks, network filesystems); others (a decoder's OSError
# without errno, ENOENT) say something about the file itself.
TRANSIENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ENOSPC, errno.EDQUOT,
                    errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETUNREACH,
                    errno.ENETDOWN, errno.EHOSTUNREACH, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.EPIPE,
                    errno.EINTR}


def _one_transient(exc: BaseException) -> bool:
    try:
        import botocore.exceptions as bce
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - boto3 is a project dependency
        bce = Urllib3Error = None
    if isinstance(exc, TransientStoreError):
        return True
    if bce is not None:
        if isinstance(exc, (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError, Urllib3Error)):
            return True
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return status >= 500 or status in (403, 408, 429) or err.get("Code") in TRANSIENT_CODES
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, FileNotFoundError):
        return False
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a condition that may pass or be fixed without
    touching the data: connection refused/reset/closed, timeouts, HTTP 5xx, 429/408, S3 SlowDown/throttling, access
    denied, OS errors such as EACCES/EIO/ENOSPC. False for problems of the object itself (a missing key, a file that
    does not decode). Callers retry transient errors and must never record them as a verdict on a file."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if _one_transient(node):
            return True
        node = node.__cause__ or node.__context__
    return False


class TransientStoreError(RuntimeError):
    """An I/O operation still failed with a transient error after every retry. ``str(err)`` is one line naming the
    operation, the object and what to do; the run must stop (nothing quarantined, nothing marked done)."""

    def __init__(self, operation: str, target: str, attempts: int, cause: BaseException) -> None:
        detail = " ".join(str(cause).split())[:200]
        super().__init__(
            f"{operation} {target} failed after {attempts} attempt(s) with a transient error "
            f"({type(cause).__name__}: {detail}); the store or file system is unreachable, throttling or refusing "
            f"access - nothing was quarantined or marked done: fix the endpoint, credentials or permissions "
            f"(or wait) and re-run")
        self.operation, self.target, self.attempts = operation, target, attempts


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How transient errors are retried around whole operations (on top of botocore's per-request retries)."""

    attempts: int = 5
    """Tries of one whole operation (a listing with all its pages, one upload, one download) before giving up."""
    base_s: float = 0.5
    """Backoff before the second try; doubled after every further failure ("full jitter": a uniform draw in 0..it)."""
    max_s: float = 20.0
    """Ceiling of one backoff."""
    botocore_attempts: int = 5
    """``max_attempts`` of botocore's own retries per HTTP request (standard mode); 1 turns them off."""
    botocore_mode: str = "standard"
    """botocore retry mode: ``standard`` or ``adaptive`` (adds client-side rate limiting under throttling)."""
    connect_timeout_s: float = 10.0
    """Seconds to wait for a TCP connection to the endpoint."""
    read_timeout_s: float = 60.0
    """Seconds to wait for bytes of a response."""


def with_retries(call: Callable[[], T], *, operation: str, target: str, policy: RetryPolicy = RetryPolicy(),
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried on transient errors (``is_transient``) with exponential backoff and full jitter; a
    permanent error is raised at once; after ``policy.attempts`` transient failures ``TransientStoreError``."""
    for attempt in range(1, max(1, policy.attempts) + 1):
        try:
            return call()
        except TransientStoreError:
            raise  # an inner operation already spent its retries
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt >= policy.attempts:
                raise TransientStoreError(operation, target, attempt, err) from err
            sleep(random.uniform(0, min(policy.max_s, policy.base_s * 2 ** (attempt - 1))))
    raise AssertionError("unreachable")


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
    """An S3 bucket/prefix. Every operation is retried whole on transient errors (``RetryPolicy``, on top of
    botocore's per-request retries); when retries run out it raises ``TransientStoreError``."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    multipart_threshold: int = 8 * 1024 * 1024
    region: str = "us-east-1"
    client: Any = field(default=None, repr=False, compare=False)  # shared by child stores; built when None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        from boto3.s3.transfer import TransferConfig

        from k5data.sources import s3_client

        # one client recipe for the project: path-style addressing (any S3-compatible store) and retries
        self._s3: Any = (self.client if self.client is not None
                         else s3_client(self.endpoint_url, self.region, retry=self.retry))
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
                       self.region, self._s3, self.retry)

    def _k(self, key: str) -> str:
        return f"{self.prefix.rstrip('/')}/{key}" if self.prefix else key

    def _retried(self, operation: str, key: str, call: Callable[[], T]) -> T:
        return with_retries(call, operation=f"S3 {operation}", target=self.uri(key), policy=self.retry)

    def put_file(self, local: Path, key: str) -> str:
        """Upload ``local`` to ``key``; returns the object's ``s3://`` URI."""
        # why: S3 objects only become visible once the (multipart) upload completes; SHA256 checksums per part
        self._retried("upload", key, lambda: self._s3.upload_file(
            str(local), self.bucket, self._k(key), Config=self._cfg, ExtraArgs={"ChecksumAlgorithm": "SHA256"}))
        return self.uri(key)

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` to ``key`` in one PUT (visible whole or not at all); returns the object's URI."""
        self._retried("put", key, lambda: self._s3.put_object(Bucket=self.bucket, Key=self._k(key), Body=data,
                                                               ChecksumAlgorithm="SHA256"))
        return self.uri(key)

    def get_file(self, key: str, local: Path) -> Path:
        """Download object ``key`` to the local path ``local`` (written whole or not at all); returns it."""
        listed = [o for o in self._listed(key) if o["Key"] == self._k(key)]
        if not listed:
            raise FileNotFoundError(f"object {key!r} not found in {self.uri(key)}")
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        if int(listed[0]["Size"]) >= self.multipart_threshold:  # ranged parts in parallel (HEAD first)
            self._retried("download", key, lambda: self._s3.download_file(
                self.bucket, self._k(key), str(local), Config=self._cfg))
            return local

        def fetch() -> None:  # why: one GET per small object, not download_file's HEAD + GET: half the requests
            body = self._s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
            tmp = local.with_name(local.name + ".partial")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(body, out, 1024 * 1024)
            os.replace(tmp, local)

        self._retried("download", key, fetch)
        return local

    def get_bytes(self, key: str) -> bytes:
        """The bytes of object ``key``."""
        def read() -> bytes:
            try:
                return self._s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
            except self._s3.exceptions.NoSuchKey:
                raise FileNotFoundError(f"object {key!r} not found in {self.uri(key)}") from None

        return self._retried("get", key, read)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    def open_read(self, key: str) -> IO[bytes]:
        return self._retried("get", key, lambda: self._s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"])

    def exists(self, key: str) -> bool:
        r = self._retried("list", key, lambda: self._s3.list_objects_v2(Bucket=self.bucket, Prefix=self._k(key)))
        return any(o["Key"] == self._k(key) for o in r.get("Contents", []))

    def _listed(self, prefix: str) -> list[dict[str, Any]]:
        # why: the whole paginated listing is one operation; a partial listing must never look like a complete one
        def pages() -> list[dict[str, Any]]:
            paginator = self._s3.get_paginator("list_objects_v2")
            return [o for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(prefix))
                    for o in page.get("Contents", [])]

        return self._retried("listing", prefix, pages)

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
            errors = self._retried("delete", prefix, lambda batch=batch: self._s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})).get("Errors")
            if errors:
                raise OSError(f"could not delete {len(errors)} objects under {self.uri(prefix)}: {errors[:3]}")
        return len(keys)


def open_store(uri: str | os.PathLike, endpoint_url: str | None = None, *, region: str | None = None,
               create: bool = True, retry: RetryPolicy | None = None) -> LocalStore | S3Store:
    """A store from a folder path, ``file://`` URI or ``s3://bucket[/prefix]`` (any S3-compatible endpoint:
    ``endpoint_url``, else ``$K5_S3_ENDPOINT_URL``; ``region`` default us-east-1; ``retry`` the S3 retry policy).
    Local folders are created unless ``create`` is False (readers: a missing folder lists as empty)."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"object store URI {text!r} has no bucket; use s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path.strip("/"),
                       endpoint_url=endpoint_url or os.environ.get("K5_S3_ENDPOINT_URL") or None,
                       region=region or "us-east-1", retry=retry or RetryPolicy())
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # one letter: a Windows drive
        root = Path(unquote(parsed.path) if parsed.scheme == "file" else text).expanduser().resolve()
        if create:
            root.mkdir(parents=True, exist_ok=True)
        return LocalStore(root)
    raise ValueError(f"object store URI {text!r}: scheme {parsed.scheme!r} is not supported; "
                     "use a folder path, file:// or s3://bucket/prefix")

"""One writer at a time on an object-store prefix: a lease object ``<prefix>/_lease.json`` and the conditional writes
it (and the versioned shard index) are built on.

Conditional writes (``put_if_absent``, ``put_if_version``, ``delete_if_version``): on S3 the server decides
(``If-None-Match: *`` / ``If-Match: <etag>``, answered 412 when the condition fails); on a ``LocalStore`` an exclusive
``flock`` on the key's folder serialises every conditional write of that folder, creation links a fully written
temporary file into place (``O_EXCL`` semantics: it fails when the key exists) and a version is the SHA-256 of the
content. A version is opaque: pass back what ``read_versioned`` or a put returned.

The lease records who holds it (host, pid, holder text such as a run id, since when) and when it expires. The holder
renews it from a daemon thread every ``ttl_s / 3`` seconds with a compare-and-swap, so a lease taken over is noticed
(``Lease.check`` raises ``LeaseLost``: a writer calls it before each publish). A lease is stale when its expiry passed
(clocks of the writers' hosts are assumed to agree within seconds) or when its holder ran on this host and that pid
is gone (a SIGKILLed writer): a stale lease is taken over with a compare-and-swap on its version and a logged line;
a live one refuses with ``LeaseHeld`` naming the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from k5data.object_store import LocalStore, ObjectStore, RetryPolicy, with_retries

log = logging.getLogger(__name__)
LEASE_NAME = "_lease.json"


# ---------------------------------------------------------------------------------------------------------------------
# conditional writes


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the version a conditional write compares against."""

    data: bytes
    version: str


def _s3_target(store: Any, key: str) -> tuple[Any, str, str]:
    """(client, bucket, full key) of ``key`` in an ``S3Store`` (its public ``client``, ``bucket`` and ``uri``)."""
    return store.client, store.bucket, store.uri(key).removeprefix(f"s3://{store.bucket}/")


def _s3_call(store: Any, key: str, operation: str, call: Callable[[], Any]) -> Any:
    """One conditional S3 request, retried whole on transient errors like every store operation. A retried write
    whose first try landed answers 412: callers compare the record's token to tell that from a lost race."""
    policy = getattr(store, "retry", None) or RetryPolicy()
    return with_retries(call, operation=f"S3 {operation}", target=store.uri(key), policy=policy)


def _s3_code(err: Exception) -> tuple[str, int]:
    response = getattr(err, "response", None) or {}
    return (str(response.get("Error", {}).get("Code", "")),
            int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0))


def _s3_condition_failed(err: Exception) -> bool:
    """The condition of a conditional request did not hold (or a concurrent conditional write won: 409)."""
    code, status = _s3_code(err)
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412)


@contextlib.contextmanager
def _folder_mutex(path: Path) -> Iterator[None]:
    """Exclusive flock on the folder holding ``path`` (every conditional write of that folder, all processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _local_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _local_write(path: Path, data: bytes, *, exclusive: bool) -> None:
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.partial")
    tmp.write_bytes(data)
    try:
        if exclusive:
            os.link(tmp, path)  # fails with FileExistsError when the key exists; readers never see a partial file
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _local_if_version(store: LocalStore, key: str, version: str, change: Callable[[Path], Any]) -> bool:
    """``change(path)`` of a local key under its folder's lock if the key still has ``version``; whether it ran."""
    path = store.root / key
    with _folder_mutex(path):
        current = read_versioned(store, key)
        if current is None or current.version != version:
            return False
        change(path)
    return True


def read_versioned(store: ObjectStore, key: str) -> Versioned | None:
    """The object at ``key`` with its version, or None when there is none."""
    if isinstance(store, LocalStore):
        path = store.root / key
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(data, _local_version(data))
    client, bucket, full = _s3_target(store, key)
    try:
        def get() -> tuple[bytes, str]:  # why: the body is read inside the retry; a cut stream is tried again
            got = client.get_object(Bucket=bucket, Key=full)
            return got["Body"].read(), got["ETag"]

        data, etag = _s3_call(store, key, "get", get)
    except Exception as err:
        if _s3_code(err)[0] in ("NoSuchKey", "404"):
            return None
        raise
    return Versioned(data, etag.strip('"'))


def put_if_absent(store: ObjectStore, key: str, data: bytes) -> str | None:
    """Create ``key`` holding ``data`` unless it exists; the new version, or None when the key already existed."""
    if isinstance(store, LocalStore):
        path = store.root / key
        with _folder_mutex(path):
            try:
                _local_write(path, data, exclusive=True)
            except FileExistsError:
                return None
        return _local_version(data)
    client, bucket, full = _s3_target(store, key)
    try:
        put = _s3_call(store, key, "conditional put",
                       lambda: client.put_object(Bucket=bucket, Key=full, Body=data, IfNoneMatch="*"))
        return put["ETag"].strip('"')
    except Exception as err:
        if _s3_condition_failed(err):
            return None
        raise


def put_if_version(store: ObjectStore, key: str, data: bytes, version: str) -> str | None:
    """Replace ``key`` by ``data`` only if it still has ``version``; the new version, or None when it changed (or is
    gone)."""
    if isinstance(store, LocalStore):
        changed = _local_if_version(store, key, version, lambda path: _local_write(path, data, exclusive=False))
        return _local_version(data) if changed else None
    client, bucket, full = _s3_target(store, key)
    try:
        put = _s3_call(store, key, "conditional put",
                       lambda: client.put_object(Bucket=bucket, Key=full, Body=data, IfMatch=version))
        return put["ETag"].strip('"')
    except Exception as err:
        if _s3_condition_failed(err):
            return None
        raise


def delete_if_version(store: ObjectStore, key: str, version: str) -> bool:
    """Delete ``key`` only if it still has ``version``; whether it was deleted."""
    if isinstance(store, LocalStore):
        return _local_if_version(store, key, version, Path.unlink)
    client, bucket, full = _s3_target(store, key)
    try:
        _s3_call(store, key, "conditional delete",
                 lambda: client.delete_object(Bucket=bucket, Key=full, IfMatch=version))
    except Exception as err:
        if _s3_condition_failed(err):
            return False
        raise
    return True


# ---------------------------------------------------------------------------------------------------------------------
# leases


@dataclass(frozen=True)
class LeaseRecord:
    """What ``<prefix>/_lease.json`` holds."""

    holder: str  # who asked for it: a run id, "k5 latents", ...
    host: str
    pid: int
    since: str  # ISO time the lease was first taken
    expires_at: float  # epoch seconds; renewed every ttl_s / 3
    ttl_s: float
    token: str  # unique per acquisition: tells two holders on one host apart

    def describe(self) -> str:
        return f"{self.holder} (host {self.host}, pid {self.pid}, since {self.since})"

    def stale_reason(self, now: float) -> str | None:
        """Why this lease may be taken over, or None while its holder may still be writing."""
        if now > self.expires_at:
            return f"expired {now - self.expires_at:.0f} s ago (ttl {self.ttl_s:g} s)"
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        if self.host == socket.gethostname() and self.pid == os.getpid() and self.token not in _HELD_TOKENS:
            return "this process left it behind (its release failed) and no longer holds it"
        return None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # unreadable (hand-edited, foreign): treated as stale


_HELD_TOKENS: set[str] = set()  # tokens of the leases this process holds now (acquired and not yet released)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    with contextlib.suppress(FileNotFoundError, IndexError):
        # a killed child not yet reaped by its parent is a zombie: it writes nothing any more
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


class LeaseHeld(RuntimeError):
    """Another live writer holds the prefix. ``str(err)`` names it and what to do."""

    def __init__(self, uri: str, record: LeaseRecord) -> None:
        left = max(0.0, record.expires_at - time.time())
        super().__init__(
            f"{uri} is being written by {record.describe()}; its lease expires in {left:.0f} s unless renewed. "
            f"Wait for that writer to finish (or stop it) and re-run; a writer that died is taken over automatically "
            f"once its lease expires")
        self.uri, self.record = uri, record


class LeaseLost(RuntimeError):
    """This writer's lease was taken over or could not be renewed in time: it must stop writing."""


class Lease:
    """A held lease (from ``acquire_lease``). ``check()`` before each publish; renewed by a daemon thread."""

    def __init__(self, store: ObjectStore, key: str, record: LeaseRecord, version: str,
                 took_over: LeaseRecord | None) -> None:
        self.store, self.key, self.record, self.version = store, key, record, version
        self.took_over = took_over  # the stale holder this lease replaced, if any
        _HELD_TOKENS.add(record.token)
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.store.uri(self.key)

    def renew(self) -> None:
        """Extend the expiry by ``ttl_s`` (compare-and-swap on this lease's version); ``LeaseLost`` if it changed."""
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            record = LeaseRecord(**{**asdict(self.record), "expires_at": time.time() + self.record.ttl_s})
            version = put_if_version(self.store, self.key, record.encode(), self.version)
            current = read_versioned(self.store, self.key) if version is None else None
            if current is not None and LeaseRecord.decode(current.data) == record:
                version = current.version  # our retried write had landed
            if version is None:
                other = LeaseRecord.decode(current.data) if current else None
                self._lost = (f"lease {self.uri} of {self.record.describe()} was taken over by "
                              f"{other.describe() if other else 'nobody (it was deleted)'}; stop writing")
                raise LeaseLost(self._lost)
            self.record, self.version = record, version

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this writer still holds the lease (renewing it when it is about to expire)."""
        if self._lost:
            raise LeaseLost(self._lost)
        if time.time() > self.record.expires_at - self.record.ttl_s / 3:
            self.renew()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.record.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as err:
                log.error(str(err))
                return
            except Exception as err:  # an unreachable store: retry on the next beat; expiry decides loss
                log.warning(f"could not renew lease {self.uri}: {type(err).__name__}: {err}")
                if time.time() > self.record.expires_at:
                    self._lost = f"lease {self.uri} expired while it could not be renewed ({err})"
                    return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.key}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this one."""
        _HELD_TOKENS.discard(self.record.token)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if not self._lost:
                delete_if_version(self.store, self.key, self.version)
            self._lost = self._lost or "lease released"


def lease_key(prefix: str) -> str:
    return f"{prefix.strip('/')}/{LEASE_NAME}" if prefix.strip("/") else LEASE_NAME


def read_lease(store: ObjectStore, prefix: str) -> LeaseRecord | None:
    """The current holder of ``prefix`` (live or stale), or None."""
    current = read_versioned(store, lease_key(prefix))
    return LeaseRecord.decode(current.data) if current else None


def _try_acquire(store: ObjectStore, key: str, holder: str, ttl_s: float) -> Lease:
    now = time.time()
    record = LeaseRecord(holder=holder, host=socket.gethostname(), pid=os.getpid(),
                         since=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
                         expires_at=now + ttl_s, ttl_s=ttl_s, token=secrets.token_hex(8))
    # held from before the write: another thread of this process that reads the record between our write and the
    # Lease object must see a live holder, not a leftover of this process to take over
    _HELD_TOKENS.add(record.token)
    try:
        return _acquire_with(store, key, record, now)
    except BaseException:
        _HELD_TOKENS.discard(record.token)
        raise


def _acquire_with(store: ObjectStore, key: str, record: LeaseRecord, now: float) -> Lease:
    version = put_if_absent(store, key, record.encode())
    if version is not None:
        # create-then-verify: an S3-compatible store without atomic conditional puts may let two creates succeed;
        # the one whose record is not there lost
        back = read_versioned(store, key)
        if back is not None and back.version == version:
            return Lease(store, key, record, version, None)
        raise _Retry
    current = read_versioned(store, key)
    if current is None:  # released between our two calls: try again
        raise _Retry
    old = LeaseRecord.decode(current.data)
    if old == record:  # our retried create had landed
        return Lease(store, key, record, current.version, None)
    reason = "its record is unreadable" if old is None else old.stale_reason(now)
    if reason is None:
        assert old is not None
        raise LeaseHeld(store.uri(key), old)
    version = put_if_version(store, key, record.encode(), current.version)
    if version is None:
        now_there = read_versioned(store, key)
        if now_there is None or LeaseRecord.decode(now_there.data) != record:
            raise _Retry  # another writer took it over (or renewed it) first
        version = now_there.version  # our retried takeover had landed
    who = old.describe() if old else "an unknown holder"
    log.warning(f"took over stale lease {store.uri(key)} of {who}: {reason}")
    return Lease(store, key, record, version, old)


class _Retry(Exception):
    pass


@contextlib.contextmanager
def acquire_lease(store: ObjectStore, prefix: str, *, holder: str, ttl_s: float = 120.0,
                  wait_s: float = 0.0, heartbeat: bool = True) -> Iterator[Lease]:
    """Hold the one-writer lease of ``prefix`` in ``store`` for the ``with`` block (renewed in the background,
    released at exit). A live holder refuses with ``LeaseHeld`` after ``wait_s`` seconds of polling; a stale one is
    taken over (logged). ``holder`` says who writes (a run id, a command)."""
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    key = lease_key(prefix)
    deadline = time.monotonic() + wait_s
    for attempt in range(1000):
        try:
            lease = _try_acquire(store, key, holder, ttl_s)
            break
        except _Retry:
            time.sleep(min(0.05 * (attempt + 1), 1.0))
        except LeaseHeld:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    else:
        raise OSError(errno.EAGAIN, f"could not acquire lease {store.uri(key)}: it kept changing")
    if heartbeat:
        lease.start()
    try:
        yield lease
    except BaseException:
        try:  # the body's error is the one to report; a lease this release cannot delete expires after its TTL
            lease.release()
        except Exception as err:
            log.warning("could not release lease %s after a failure (%s); it expires in %.0f s",
                        store.uri(key), err, ttl_s)
        raise
    lease.release()

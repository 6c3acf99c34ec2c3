"""Login protection for the annotation apps: rate limiting with lockout, constant-time answers for unknown names,
password checks off the event loop, owner-only files.

The pieces are independent of Gradio so any task mounted into the annotation server (SBS, SFT) shares them:

* ``LoginThrottle`` -- pure bookkeeping (clock passed in): failures counted per login name and per client address
  over a sliding window; reaching the limit locks that name / client for ``lockout_s``. A success clears the name.
* ``LoginGuard`` -- ``LoginGuard.login`` is the async ``auth`` function handed to Gradio: refuses locked
  names/clients with HTTP 429, runs the scrypt check in its own small thread pool (a login flood never stalls the
  event loop that serves annotators),
  verifies unknown names against a dummy hash (same scrypt work, so timing does not tell valid names from invalid),
  paces password checks globally (a flood from many addresses is bounded in CPU), and pads every failed answer to
  the same minimum duration.
* ``ClientAddressMiddleware`` -- pure ASGI; records the client address of the request for ``LoginGuard`` (Gradio's
  ``auth`` callable only receives name and password). Behind a reverse proxy, uvicorn's proxy-header handling (trusted
  ``--forwarded-allow-ips``) has already put the real client address into the scope.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from evaluation.sbs.judgments_store import hash_password, verify_password

MAX_NAME_CHARS = 128
"""Longer login names are refused before any work (they also bound the throttle's memory per entry)."""
MAX_PASSWORD_CHARS = 1024
"""Longer passwords are refused before hashing."""

PasswordLookup = Callable[[str], "str | None"]
"""Login name -> stored scrypt line, or None for an unknown name."""

_client_address: contextvars.ContextVar[str] = contextvars.ContextVar("k5_client_address", default="unknown")


class LoginRefused(Exception):
    """A login refused before its password was checked: ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, kw_only=True)
class LoginPolicy:
    """Limits on login attempts (defaults follow common practice for small internal tools)."""

    max_failures_per_name: int = 5
    """Failed attempts for one login name within ``window_s`` that lock the name."""
    max_failures_per_client: int = 20
    """Failed attempts from one client address within ``window_s`` that lock the address."""
    window_s: float = 300.0
    """Sliding window over which failures are counted."""
    lockout_s: float = 300.0
    """How long a locked name or address is refused without checking its password."""
    failure_min_s: float = 1.0
    """Every failed or refused login answers after at least this long (slows guessing, hides timing)."""
    checks_per_s: float = 2.0
    """Sustained password checks per second over all clients (each is one scrypt: ~50 ms of a core), so a flood
    from many addresses takes at most ~10% of a core."""
    checks_burst: int = 30
    """Password checks allowed at once above the sustained rate (a whole team logging in together)."""
    max_wait_s: float = 5.0
    """A login that would wait longer than this for a check slot is refused as busy (HTTP 429)."""
    hash_workers: int = 1
    """Threads running scrypt checks (off the event loop; bounds the CPU a flood can take)."""
    hash_nice: int = 19
    """Niceness of those threads (Linux sets it per thread): on a busy machine password checks get the CPU only
    after the threads serving annotators; 0 leaves them at the server's priority."""
    max_tracked: int = 100_000
    """Names/addresses kept in memory; the oldest entries are dropped beyond this."""

    def __post_init__(self) -> None:
        for name in ("max_failures_per_name", "max_failures_per_client", "checks_burst", "hash_workers",
                     "max_tracked"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoginPolicy.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("window_s", "lockout_s", "checks_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LoginPolicy.{name} must be > 0, got {getattr(self, name)}")


class LoginThrottle:
    """Failure counting and lockout per login name and per client address (not thread-safe: call from one loop)."""

    def __init__(self, policy: LoginPolicy) -> None:
        self.policy = policy
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._locked_until: dict[tuple[str, str], float] = {}

    def retry_after(self, name: str, client: str, now: float) -> float:
        """Seconds until ``name`` from ``client`` may try again (0.0: allowed now)."""
        wait = 0.0
        for key in (("name", name), ("client", client)):
            until = self._locked_until.get(key)
            if until is not None:
                if until > now:
                    wait = max(wait, until - now)
                else:
                    del self._locked_until[key]
        return wait

    def record_failure(self, name: str, client: str, now: float) -> None:
        limits = {"name": self.policy.max_failures_per_name, "client": self.policy.max_failures_per_client}
        for key in (("name", name), ("client", client)):
            times = self._failures.setdefault(key, deque())
            times.append(now)
            while times and times[0] <= now - self.policy.window_s:
                times.popleft()
            if len(times) >= limits[key[0]]:
                self._locked_until[key] = now + self.policy.lockout_s
                times.clear()
        self._prune()

    def record_success(self, name: str, client: str, now: float) -> None:  # noqa: ARG002 -- same shape as failure
        """A correct password clears the name's failures (the address keeps its count: it may be guessing others)."""
        self._failures.pop(("name", name), None)

    def _prune(self) -> None:
        for table in (self._failures, self._locked_until):
            while len(table) > self.policy.max_tracked:
                table.pop(next(iter(table)))  # dicts keep insertion order: drop the oldest


def password_lookup_from_file(path: str | Path) -> PasswordLookup:
    """Name -> stored scrypt line, from a credentials file (``annotator:scrypt$...`` lines, ``#`` comments).
    Warns on stderr when the file is readable by group or others."""
    path = Path(path)
    mode = path.stat().st_mode & 0o077
    if mode:
        print(f"warning: credentials file {path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}); "
              f"run: chmod 600 {path}", file=sys.stderr, flush=True)
    table: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, hashed = line.partition(":")
            table[name.strip()] = hashed.strip()
    return table.get


class LoginGuard:
    """Checks logins: ``await guard.login(name, password) -> bool`` is Gradio's ``auth``; raises 429 when refused.

    ``lookup(name)`` returns the stored scrypt line or None for an unknown name; it runs in the guard's thread pool
    together with the hash check (it may hit a database)."""

    def __init__(self, lookup: PasswordLookup, policy: LoginPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lookup = lookup
        self.policy = policy or LoginPolicy()
        self.throttle = LoginThrottle(self.policy)
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=self.policy.hash_workers, thread_name_prefix="k5-login",
                                        initializer=_lower_thread_priority, initargs=(self.policy.hash_nice,))
        self._dummy = hash_password(os.urandom(16).hex())  # verified for unknown names: the same scrypt work
        self._next_slot = 0.0  # pacing of password checks (a virtual-time token bucket)
        self.checks = 0  # password checks run (tests and the bench read it)
        self.pads = 0  # answers held back to failure_min_s (tests read it)

    def _check(self, name: str, password: str) -> bool:
        stored = self.lookup(name)
        ok = verify_password(password, stored if stored is not None else self._dummy)
        return ok and stored is not None

    def _slot_delay(self, now: float) -> float:
        """Reserve one password-check slot; returns how long to wait for it (or raises when that is too long)."""
        interval = 1.0 / self.policy.checks_per_s
        start = max(self._next_slot, now - (self.policy.checks_burst - 1) * interval)
        wait = max(0.0, start - now)
        if wait > self.policy.max_wait_s:
            raise LoginRefused("the server is busy checking logins; try again shortly", wait)
        self._next_slot = start + interval
        return wait

    async def verify(self, name: str, password: str, client: str) -> bool:
        """Check one login; raises ``LoginRefused`` for a locked name/address or when checks are saturated."""
        started = self.clock()
        try:
            if len(name) > MAX_NAME_CHARS or len(password) > MAX_PASSWORD_CHARS:
                raise LoginRefused(f"login name or password too long (limits {MAX_NAME_CHARS} / "
                                   f"{MAX_PASSWORD_CHARS} characters)", 0.0)
            locked = self.throttle.retry_after(name, client, started)
            if locked > 0:
                raise LoginRefused(f"too many failed logins; try again in {locked:.0f} s", locked)
            await asyncio.sleep(self._slot_delay(started))
            self.checks += 1
            ok = await asyncio.get_running_loop().run_in_executor(self._pool, self._check, name, password)
        except LoginRefused:
            await self._pad(started)
            raise
        if ok:
            self.throttle.record_success(name, client, self.clock())
            return True
        self.throttle.record_failure(name, client, self.clock())
        await self._pad(started)
        return False

    async def _pad(self, started: float) -> None:
        remaining = self.policy.failure_min_s - (self.clock() - started)
        if remaining > 0:
            self.pads += 1
            await asyncio.sleep(remaining)

    async def login(self, name: str, password: str) -> bool:
        """Gradio's ``auth``: a coroutine *function* (Gradio awaits only those; an object with an async
        ``__call__`` would be called without await and its coroutine taken as a success)."""
        from fastapi import HTTPException

        try:
            return await self.verify(name, password, _client_address.get())
        except LoginRefused as exc:
            raise HTTPException(status_code=429, detail=str(exc),
                                headers={"Retry-After": str(max(1, round(exc.retry_after_s)))}) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _lower_thread_priority(nice: int) -> None:
    """Raise this thread's niceness by ``nice`` (per thread on Linux; elsewhere it would be the whole process)."""
    if nice > 0 and sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                                                            + nice))
        except OSError:
            pass  # not allowed here: the checks just run at the server's priority


class ClientAddressMiddleware:
    """Pure ASGI middleware: makes the request's client address visible to ``LoginGuard`` (a context variable)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            _client_address.set(client[0] if client else "unknown")
        await self.app(scope, receive, send)


def create_private_file(path: str | Path) -> Path:
    """Create ``path`` (empty) readable and writable by its owner only (0600); an existing file is left as it is."""
    path = Path(path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    return path


def write_private_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically with owner-only permissions (credentials files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path

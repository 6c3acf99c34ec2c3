"""Login protection and private files of the annotation app (issue 20): each rule shown deciding both ways.

Real scrypt, real DuckDB files, and for the HTTP checks the real server (Gradio mounted by ``ui.server``) in-process
on 127.0.0.1, spoken to with httpx; client addresses come from X-Forwarded-For, which uvicorn trusts from
localhost only (what a reverse proxy in front of the app sends)."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port

from evaluation.sbs.judgments_store import (
    MAX_REASON_CHARS,
    InvalidJudgment,
    JudgmentsStore,
    hash_password,
    verify_password,
)
from evaluation.sbs.sbs_plan import Assignment, Plan, PlanItem
from ui.security import (
    MAX_NAME_CHARS,
    LoginGuard,
    LoginPolicy,
    LoginRefused,
    LoginThrottle,
    password_lookup_from_file,
)
from ui.server import MediaGrants, OpaqueRefs

FAST = {"failure_min_s": 0.0, "checks_burst": 100, "checks_per_s": 100.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_locks_a_name_at_its_limit_and_releases_it_after_the_lockout() -> None:
    t = LoginThrottle(LoginPolicy(max_failures_per_name=3, max_failures_per_client=100, window_s=60, lockout_s=120))
    for k in range(2):
        t.record_failure("ann1", f"10.0.0.{k}", now=0.0)
    assert t.retry_after("ann1", "10.0.0.9", now=1.0) == 0.0  # 2 of 3: still allowed
    t.record_failure("ann1", "10.0.0.3", now=1.0)
    assert t.retry_after("ann1", "10.0.0.9", now=2.0) == pytest.approx(119.0)  # 3 of 3: locked, from any address
    assert t.retry_after("ann2", "10.0.0.9", now=2.0) == 0.0  # other names are not
    assert t.retry_after("ann1", "10.0.0.9", now=121.5) == 0.0  # lockout over


def test_throttle_counts_failures_in_a_sliding_window_and_a_success_clears_the_name() -> None:
    t = LoginThrottle(LoginPolicy(max_failures_per_name=3, max_failures_per_client=100, window_s=60, lockout_s=120))
    for now in (0.0, 30.0, 61.0):  # the first failure has left the window when the third comes
        t.record_failure("ann1", "c", now=now)
    assert t.retry_after("ann1", "c", now=62.0) == 0.0
    t.record_success("ann1", "c", now=62.0)
    t.record_failure("ann1", "c", now=63.0)
    t.record_failure("ann1", "c", now=64.0)
    assert t.retry_after("ann1", "c", now=65.0) == 0.0  # the success reset the count
    t.record_failure("ann1", "c", now=66.0)
    assert t.retry_after("ann1", "c", now=67.0) > 0


def test_throttle_locks_a_guessing_client_across_names_but_not_other_clients() -> None:
    t = LoginThrottle(LoginPolicy(max_failures_per_name=100, max_failures_per_client=4, window_s=60, lockout_s=30))
    for k in range(3):
        t.record_failure(f"guess{k}", "203.0.113.7", now=float(k))
    assert t.retry_after("someone", "203.0.113.7", now=3.0) == 0.0
    t.record_failure("guess3", "203.0.113.7", now=3.0)
    assert t.retry_after("someone", "203.0.113.7", now=4.0) == pytest.approx(29.0)
    assert t.retry_after("someone", "198.51.100.1", now=4.0) == 0.0


def test_throttle_memory_is_bounded() -> None:
    t = LoginThrottle(LoginPolicy(max_tracked=50))
    for k in range(500):
        t.record_failure(f"n{k}", f"c{k}", now=float(k))
    assert len(t._failures) <= 50 and len(t._locked_until) <= 50


def test_policy_refuses_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="max_failures_per_name"):
        LoginPolicy(max_failures_per_name=0)
    with pytest.raises(ValueError, match="checks_per_s"):
        LoginPolicy(checks_per_s=0)


def _guard(policy: dict, clock=time.monotonic) -> LoginGuard:
    table = {"ann1": hash_password("right")}
    return LoginGuard(table.get, LoginPolicy(**{**FAST, **policy}), clock=clock)


def test_guard_accepts_the_right_password_and_locks_a_name_after_failures() -> None:
    clock = FakeClock()
    guard = _guard({"max_failures_per_name": 2, "lockout_s": 60}, clock)

    async def scenario() -> None:
        assert await guard.verify("ann1", "right", "c1") is True
        assert await guard.verify("ann1", "wrong", "c1") is False
        assert await guard.verify("ann1", "right", "c2") is True  # one failure, then success: not locked
        assert await guard.verify("ann1", "wrong", "c1") is False
        assert await guard.verify("ann1", "wrong", "c2") is False  # second failure in a row: locked
        checks = guard.checks
        with pytest.raises(LoginRefused, match="too many failed logins"):
            await guard.verify("ann1", "right", "c3")  # even the right password, from anywhere
        assert guard.checks == checks  # refused without spending a scrypt
        clock.now += 61
        assert await guard.verify("ann1", "right", "c3") is True

    asyncio.run(scenario())
    guard.close()


def test_guard_does_the_same_scrypt_work_for_unknown_names() -> None:
    guard = _guard({})
    timings: dict[str, list[float]] = {"known": [], "unknown": []}

    async def scenario() -> None:
        for _ in range(3):
            for kind, name in (("known", "ann1"), ("unknown", "nobody")):
                t0 = time.perf_counter()
                assert await guard.verify(name, "wrong", "c") is False
                timings[kind].append(time.perf_counter() - t0)

    asyncio.run(scenario())
    guard.close()
    assert guard.checks == 6  # every attempt, known name or not, ran one password check
    known, unknown = min(timings["known"]), min(timings["unknown"])
    # an unknown name used to answer ~18x faster (no scrypt); now both pay one scrypt
    assert unknown > 0.5 * known, timings


def test_guard_pads_failures_to_a_minimum_duration() -> None:
    guard = _guard({"failure_min_s": 0.4})

    async def scenario() -> float:
        t0 = time.monotonic()
        assert await guard.verify("nobody", "x", "c") is False
        failed = time.monotonic() - t0
        assert guard.pads == 1  # the failure was held back ...
        assert await guard.verify("ann1", "right", "c") is True
        assert guard.pads == 1  # ... a success never is
        return failed

    failed = asyncio.run(scenario())
    guard.close()
    assert failed >= 0.4  # a lower bound only: load can make it longer, never shorter


def test_guard_keeps_the_event_loop_free_during_a_login_flood() -> None:
    """Eight concurrent logins whose credential lookup blocks until the event loop releases it: through the guard
    the loop keeps running and releases them all; the same lookup called on the loop (what Gradio does with a plain
    ``auth`` function) blocks the loop, so nothing on it can release it. No wall-clock figures involved."""
    release = threading.Event()
    threads: list[int] = []
    stored = hash_password("right")

    def lookup(name: str) -> str | None:
        threads.append(threading.get_ident())
        released = release.wait(timeout=30)  # True only if the loop got to run while this check was in flight
        return stored if released else None

    guard = LoginGuard(lookup, LoginPolicy(**{**FAST, "hash_workers": 1}))

    async def flood() -> tuple[list[bool], int]:
        logins = asyncio.gather(*(guard.verify("ann1", "right", f"c{k}") for k in range(8)))
        while not threads:
            await asyncio.sleep(0.001)  # the loop keeps turning while a check is in flight ...
        release.set()  # ... so it can release them
        return await logins, threading.get_ident()

    results, loop_thread = asyncio.run(flood())
    guard.close()
    assert results == [True] * 8 and loop_thread not in threads

    release.clear()

    async def on_loop() -> bool:
        asyncio.get_running_loop().call_soon(release.set)  # due at once, but the loop is held by the wait below
        return release.wait(timeout=0.2)

    assert asyncio.run(on_loop()) is False  # a blocking check on the loop: the loop could not release it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is a Linux feature")
def test_guard_runs_checks_at_low_priority_unless_told_not_to() -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = os.getpriority(os.PRIO_PROCESS, 0)
    low, same = _guard({}), _guard({"hash_nice": 0})
    assert low._pool.submit(niceness).result() == min(19, base + 19)
    assert same._pool.submit(niceness).result() == base
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the process (annotators' threads) is untouched
    low.close()
    same.close()


def test_guard_paces_password_checks_and_refuses_when_the_wait_is_too_long() -> None:
    guard = _guard({"checks_per_s": 2.0, "checks_burst": 2, "max_wait_s": 0.3})

    async def scenario() -> list:
        return await asyncio.gather(*(guard.verify(f"n{k}", "x", f"c{k}") for k in range(4)),
                                    return_exceptions=True)

    results = asyncio.run(scenario())
    guard.close()
    assert results[:2] == [False, False]  # the burst is checked
    assert all(isinstance(r, LoginRefused) and "busy" in str(r) for r in results[2:])  # would wait >= 0.5 s


def test_guard_refuses_overlong_names_without_checking() -> None:
    guard = _guard({})
    with pytest.raises(LoginRefused, match="too long"):
        asyncio.run(guard.verify("x" * (MAX_NAME_CHARS + 1), "pw", "c"))
    assert guard.checks == 0
    guard.close()


def test_opaque_refs_and_media_grants_belong_to_one_annotator(tmp_path: Path) -> None:
    refs = OpaqueRefs()
    tok = refs.token("ann1", "item-7", "item-7")
    assert refs.token("ann1", "item-7", "item-7") == tok  # stable while the server runs
    assert refs.value("ann1", tok) == "item-7" and refs.value("ann2", tok) is None
    assert refs.token("ann2", "item-7", "item-7") != tok
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "p0_a.mp4").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("s")
    grants = MediaGrants(tmp_path / "media")
    url = grants.url("ann1", ("p0", "left"), "p0_a.mp4")
    assert url.startswith("/media/") and "p0_a" not in url and ".mp4" not in url  # token chars may hold "p0"
    token = url.removeprefix("/media/")
    assert grants.file_for("ann1", token) == (tmp_path / "media" / "p0_a.mp4").resolve()
    assert grants.file_for("ann2", token) is None
    with pytest.raises(ValueError, match="leaves the media root"):
        grants.url("ann1", ("p0", "right"), "../secret.txt")


def test_store_and_credentials_files_are_owner_only(tmp_path: Path) -> None:
    from ui.annotation_app import add_credentials

    old = os.umask(0o022)  # a permissive umask, as in a login shell
    try:
        store = JudgmentsStore(tmp_path / "j.duckdb")
        creds = tmp_path / "creds.txt"
        add_credentials(creds, "ann1", "one")
        add_credentials(creds, "ann2", "two")
        add_credentials(creds, "ann1", "uno")  # replaces ann1's line
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "j.duckdb").stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    lookup = password_lookup_from_file(creds)
    assert verify_password("uno", lookup("ann1")) and verify_password("two", lookup("ann2"))
    assert lookup("ghost") is None and creds.read_text().count("ann1:") == 1
    store.set_password("ann3", "three")
    assert verify_password("three", store.password_hash("ann3")) and store.password_hash("ghost") is None


def test_loose_credentials_file_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    creds = tmp_path / "creds.txt"
    creds.write_text(f"ann1:{hash_password('x')}\n")
    creds.chmod(0o644)
    password_lookup_from_file(creds)
    assert "readable by others" in capsys.readouterr().err
    creds.chmod(0o600)
    password_lookup_from_file(creds)
    assert capsys.readouterr().err == ""


def test_skip_reason_length_is_limited(tmp_path: Path) -> None:
    store = JudgmentsStore(tmp_path / "j.duckdb")
    store.load_plan(Plan([PlanItem("v1", "a cat", "a.mp4", "b.mp4"), PlanItem("v2", "a dog", "c.mp4", "d.mp4")],
                         [Assignment("ann1", "v1", True, 0), Assignment("ann1", "v2", True, 1)], overlap=1, seed=0))
    with pytest.raises(InvalidJudgment, match=f"at most {MAX_REASON_CHARS}"):
        store.skip("ann1", "v1", "x" * (MAX_REASON_CHARS + 1))
    store.skip("ann1", "v1", "x" * MAX_REASON_CHARS)
    assert store.next_task("ann1").item_id == "v2"


@pytest.fixture(scope="module")
def live_app(tmp_path_factory: pytest.TempPathFactory):
    """The real annotation server in this process (uvicorn thread) on a tiny plan, with a tight login policy."""
    from ui.annotation_app import build_app, serve

    root = tmp_path_factory.mktemp("live")
    (root / "media").mkdir()
    store = JudgmentsStore(root / "j.duckdb")
    store.set_password("ann1", "right")
    plan = Plan([PlanItem("v1", "a cat", "a.mp4", "b.mp4")], [Assignment("ann1", "v1", True, 0)], overlap=1, seed=0)
    policy = LoginPolicy(max_failures_per_name=50, max_failures_per_client=3, failure_min_s=0.0, lockout_s=60)
    app = build_app(store, plan, root / "media", store.password_hash, login_policy=policy)
    url = serve(app, "127.0.0.1", free_port(), block=False)
    yield url
    app.k5_guard.close()


def _login(url: str, name: str, password: str, client: str) -> httpx.Response:
    return httpx.post(url + "login", data={"username": name, "password": password},
                      headers={"X-Forwarded-For": client}, timeout=30)


def test_http_login_locks_out_a_guessing_client_only(live_app: str) -> None:
    assert _login(live_app, "ann1", "right", "198.51.100.1").status_code == 200
    for k in range(3):
        assert _login(live_app, f"guess{k}", "x", "203.0.113.9").status_code == 400  # wrong: 400, as Gradio says
    locked = _login(live_app, "ann1", "right", "203.0.113.9")
    assert locked.status_code == 429 and "too many failed logins" in locked.text and locked.headers["retry-after"]
    assert _login(live_app, "ann1", "right", "198.51.100.2").status_code == 200  # another client is not locked


def test_http_unknown_endpoints_and_foreign_media_are_4xx(live_app: str) -> None:
    for path in ("no/such/endpoint", "media/not-a-token", "gradio_api/file=/etc/passwd", "docs", "openapi.json"):
        assert 400 <= httpx.get(live_app + path, timeout=30).status_code < 500, path

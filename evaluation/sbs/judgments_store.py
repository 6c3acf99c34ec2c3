"""DuckDB storage of SBS judgments: one store per comparison (``K5_HOME/sbs/<comparison>/judgments.duckdb``), read
and written by the annotation app, the ``sbs_report`` asset and ``k5 sbs export``.

DuckDB admits one process on a file at a time, so every operation opens the file, runs in one transaction and
closes it again: the running app and a report (or an export) take turns; a process that finds the file locked by
another retries for ``busy_timeout_s`` before raising ``StoreBusy``. Within a process one lock serialises the
operations (concurrent annotators are threads). Each write is committed before the call returns -- the UI confirms a
judgment only after that, so a crash loses nothing that was confirmed on screen.

Tables
  annotators(annotator PK, password)                     password = "scrypt$n$r$p$salt_hex$hash_hex"
  items(item_id PK, prompt, media_a, media_b, kind, golden, better)
  assignments(annotator, item_id, a_on_left, position)  PK (annotator, item_id)
  judgments(seq, annotator, item_id, criterion, choice_screen, choice, a_on_left, created_at)
            one row per annotator x item x criterion (PK); ``choice`` is in A/B terms (model 1 = A),
            ``choice_screen`` as clicked (model 1 = left)
  skips(seq, annotator, item_id, reason, created_at)    PK (annotator, item_id)
``seq`` comes from one sequence shared by judgments and skips, so "undo" removes the annotator's latest action.

The file holds password hashes: a store that creates it makes it owner-only (0600), and tightens the write-ahead log
the same way while it exists.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd

from evaluation.sbs.sbs_plan import Plan, criteria_for
from evaluation.sbs.sbs_scores import NA, allowed_choices, is_valid, unswap_choice


class NotAssigned(PermissionError):
    """A judgment for an item that is not in the annotator's assignments."""


class InvalidJudgment(ValueError):
    """Unknown criterion, a choice not allowed for it, or a criterion not asked for this item's media kind."""


class AlreadyJudged(ValueError):
    """The annotator already judged this criterion of this item (undo first)."""


class StoreBusy(RuntimeError):
    """Another process kept the judgments file locked for longer than the store's busy timeout."""


MAX_REASON_CHARS = 500
"""Longest skip reason accepted (free text typed by annotators)."""


# --- passwords ------------------------------------------------------------------------------------------------------

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str, salt: bytes | None = None) -> str:
    """scrypt with a per-user random salt -> "scrypt$n$r$p$salt_hex$hash_hex" (the credentials file format)."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, hash_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p), dklen=32)
    return hmac.compare_digest(digest.hex(), hash_hex)  # constant time


def _utcnow() -> datetime:
    # naive UTC: the TIMESTAMP columns hold UTC whatever the server's time zone
    return datetime.now(UTC).replace(tzinfo=None)


# --- store ----------------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS action_seq START 1;
CREATE TABLE IF NOT EXISTS annotators (annotator VARCHAR PRIMARY KEY, password VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id VARCHAR PRIMARY KEY, prompt VARCHAR NOT NULL, media_a VARCHAR NOT NULL, media_b VARCHAR NOT NULL,
    kind VARCHAR NOT NULL, golden VARCHAR, better VARCHAR);
CREATE TABLE IF NOT EXISTS assignments (
    annotator VARCHAR NOT NULL, item_id VARCHAR NOT NULL, a_on_left BOOLEAN NOT NULL, position INTEGER NOT NULL,
    PRIMARY KEY (annotator, item_id));
CREATE TABLE IF NOT EXISTS judgments (
    seq BIGINT NOT NULL, annotator VARCHAR NOT NULL, item_id VARCHAR NOT NULL, criterion VARCHAR NOT NULL,
    choice_screen VARCHAR NOT NULL, choice VARCHAR NOT NULL, a_on_left BOOLEAN NOT NULL,
    created_at TIMESTAMP NOT NULL, PRIMARY KEY (annotator, item_id, criterion));  -- UTC
CREATE TABLE IF NOT EXISTS skips (
    seq BIGINT NOT NULL, annotator VARCHAR NOT NULL, item_id VARCHAR NOT NULL, reason VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL, PRIMARY KEY (annotator, item_id));
"""


@dataclass(frozen=True)
class Task:
    """What an annotator should do next: an item, its sides, and the next criterion (None when all are done)."""

    item_id: str
    prompt: str
    left: str  # media path shown on the left
    right: str
    kind: str
    a_on_left: bool
    criterion: str
    phase: int  # 1 visual quality (prompt hidden), 2 prompt following (prompt shown)
    done: int  # items finished (judged or skipped) by this annotator
    total: int  # items assigned to this annotator


@dataclass(frozen=True)
class Answer:
    """What ``JudgmentsStore.answer`` did."""

    saved: bool  # the judgment was stored by this call
    previous: str | None  # when not saved: the on-screen choice stored earlier for that (item, criterion), if any
    task: Task | None  # the annotator's next task after the call


class JudgmentsStore:
    """One comparison's judgments file. Thread-safe; the file is open only during an operation (module docstring)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = str(path)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        created = not Path(self.path).exists()
        with self._connection() as con:
            if created:
                os.chmod(self.path, 0o600)  # before the schema (and any hash) is written
            con.execute(_SCHEMA)

    @contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The file, opened for one operation under the thread lock (retrying while another process holds it)."""
        with self._lock:
            deadline = time.monotonic() + self.busy_timeout_s
            while True:
                try:
                    con = duckdb.connect(self.path)
                    break
                except duckdb.IOException as exc:
                    if "lock" not in str(exc).lower():
                        raise
                    if time.monotonic() > deadline:
                        raise StoreBusy(f"{self.path} stayed locked by another process for {self.busy_timeout_s:.0f}"
                                        f" s ({exc}); retry when it is done") from exc
                    time.sleep(0.05)
            try:
                yield con
            finally:
                wal = Path(self.path + ".wal")
                if wal.exists() and wal.stat().st_mode & 0o077:
                    wal.chmod(0o600)
                con.close()

    def close(self) -> None:
        """Nothing stays open between operations; kept so callers can use the store as a context manager."""

    def __enter__(self) -> JudgmentsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: list | tuple = ()) -> list[tuple]:
        with self._connection() as con:
            return con.execute(sql, params).fetchall()

    # --- set-up ---------------------------------------------------------------------------------------------------

    def load_plan(self, plan: Plan) -> None:
        """Insert the plan's items and assignments (idempotent: rows already there are kept as they are)."""
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                for i in plan.items:
                    con.execute("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                [i.item_id, i.prompt, i.media_a, i.media_b, i.kind, i.golden, i.better])
                for a in plan.assignments:
                    con.execute("INSERT INTO assignments VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                [a.annotator, a.item_id, a.a_on_left, a.position])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise

    def set_password(self, annotator: str, password: str) -> None:
        hashed = hash_password(password)  # slow on purpose: outside the lock
        with self._connection() as con:
            con.execute("INSERT OR REPLACE INTO annotators VALUES (?, ?)", [annotator, hashed])

    def password_hash(self, annotator: str) -> str | None:
        """The stored scrypt line of ``annotator`` (None when unknown): the app's login lookup."""
        rows = self._query("SELECT password FROM annotators WHERE annotator = ?", [annotator])
        return rows[0][0] if rows else None

    def check_password(self, annotator: str, password: str) -> bool:
        stored = self.password_hash(annotator)
        return stored is not None and verify_password(password, stored)

    # --- writes ---------------------------------------------------------------------------------------------------

    def record(self, annotator: str, item_id: str, criterion: str, choice_screen: str) -> int:
        """Store one judgment as clicked on screen (model 1 = left); returns its seq once committed.
        Raises NotAssigned, InvalidJudgment or AlreadyJudged; nothing is written then."""
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                seq = self._insert(con, annotator, item_id, criterion, choice_screen)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return seq

    def record_many(self, rows: Iterable[tuple[str, str, str, str]]) -> int:
        """Bulk ``record`` of (annotator, item_id, criterion, choice_screen) rows in one transaction (e.g. simulated
        raters); rows already judged are left as they are. All or nothing on any other refusal. Returns rows written."""
        written = 0
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                for annotator, item_id, criterion, choice_screen in rows:
                    try:
                        self._insert(con, annotator, item_id, criterion, choice_screen)
                        written += 1
                    except AlreadyJudged:
                        pass
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return written

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, annotator: str, item_id: str, criterion: str,
                choice_screen: str) -> int:
        if not is_valid(criterion, choice_screen):
            raise InvalidJudgment(f"{choice_screen!r} is not an option of {criterion!r}")
        row = con.execute(
            "SELECT a.a_on_left, i.kind FROM assignments a JOIN items i USING (item_id) "
            "WHERE a.annotator = ? AND a.item_id = ?", [annotator, item_id]).fetchone()
        if row is None:
            raise NotAssigned(f"{item_id!r} is not assigned to {annotator!r}")
        a_on_left, kind = bool(row[0]), row[1]
        visual, pf = criteria_for(kind)
        if criterion not in visual + pf:
            raise InvalidJudgment(f"{criterion!r} is not asked for {kind} pairs")
        if con.execute("SELECT 1 FROM skips WHERE annotator = ? AND item_id = ?", [annotator, item_id]).fetchone():
            raise AlreadyJudged(f"{item_id!r} was skipped by {annotator!r}")
        if con.execute("SELECT 1 FROM judgments WHERE annotator = ? AND item_id = ? AND criterion = ?",
                       [annotator, item_id, criterion]).fetchone():
            raise AlreadyJudged(f"{annotator!r} already judged {criterion!r} of {item_id!r}")
        seq = con.execute("SELECT nextval('action_seq')").fetchone()[0]
        con.execute("INSERT INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [seq, annotator, item_id, criterion, choice_screen, unswap_choice(choice_screen, a_on_left),
                     a_on_left, _utcnow()])
        return int(seq)

    def skip(self, annotator: str, item_id: str, reason: str) -> int:
        """Skip an assigned item with a (non-empty) reason of at most ``MAX_REASON_CHARS`` characters; its partial
        judgments stay but it counts as done."""
        if not reason.strip():
            raise ValueError("a skip needs a reason")
        if len(reason.strip()) > MAX_REASON_CHARS:
            raise InvalidJudgment(f"a skip reason may have at most {MAX_REASON_CHARS} characters, "
                                  f"got {len(reason.strip())}")
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                if con.execute("SELECT 1 FROM assignments WHERE annotator = ? AND item_id = ?",
                               [annotator, item_id]).fetchone() is None:
                    raise NotAssigned(f"{item_id!r} is not assigned to {annotator!r}")
                seq = con.execute("SELECT nextval('action_seq')").fetchone()[0]
                con.execute("INSERT INTO skips VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                            [seq, annotator, item_id, reason.strip(), _utcnow()])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return int(seq)

    def undo_last(self, annotator: str) -> tuple[str, str, str | None] | None:
        """Remove the annotator's latest action (judgment or skip). Returns ("judgment", item, criterion),
        ("skip", item, None) or None when there is nothing to undo. Only ever touches the caller's own rows."""
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                row = con.execute(
                    "SELECT seq, kind, item_id, criterion FROM ("
                    " SELECT seq, 'judgment' AS kind, item_id, criterion FROM judgments WHERE annotator = ?"
                    " UNION ALL SELECT seq, 'skip', item_id, NULL FROM skips WHERE annotator = ?"
                    ") ORDER BY seq DESC LIMIT 1", [annotator, annotator]).fetchone()
                if row is not None:
                    table = "judgments" if row[1] == "judgment" else "skips"
                    con.execute(f"DELETE FROM {table} WHERE annotator = ? AND seq = ?", [annotator, row[0]])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return None if row is None else (row[1], row[2], row[3])

    # --- reads ----------------------------------------------------------------------------------------------------

    def next_task(self, annotator: str) -> Task | None:
        """Resume point: the first item in queue order that is neither skipped nor fully judged, and its first
        unjudged criterion (visual criteria first, then prompt following). None when the queue is finished."""
        with self._connection() as con:
            return self._next_task(con, annotator)

    def answer(self, annotator: str, item_id: str, criterion: str, choice_screen: str) -> Answer:
        """The app's press of an answer, in one file operation: store the judgment only if (item, criterion) is the
        annotator's current task (what the screen showed), and return the next task. Otherwise nothing is written
        and ``Answer.previous`` holds the choice stored earlier for that (item, criterion), if any. Raises like
        ``record`` for an invalid or unassigned judgment."""
        with self._connection() as con:
            current = self._next_task(con, annotator)
            if current is None or (current.item_id, current.criterion) != (item_id, criterion):
                row = con.execute("SELECT choice_screen FROM judgments WHERE annotator = ? AND item_id = ? "
                                  "AND criterion = ?", [annotator, item_id, criterion]).fetchone()
                return Answer(saved=False, previous=row[0] if row else None, task=current)
            con.execute("BEGIN")
            try:
                self._insert(con, annotator, item_id, criterion, choice_screen)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
            return Answer(saved=True, previous=None, task=self._next_task(con, annotator))

    @staticmethod
    def _next_task(con: duckdb.DuckDBPyConnection, annotator: str) -> Task | None:
        queue = con.execute(
            "SELECT a.item_id, a.a_on_left, i.prompt, i.media_a, i.media_b, i.kind FROM assignments a "
            "JOIN items i USING (item_id) WHERE a.annotator = ? ORDER BY a.position", [annotator]).fetchall()
        judged = con.execute("SELECT item_id, criterion FROM judgments WHERE annotator = ?", [annotator]).fetchall()
        skipped = {r[0] for r in con.execute("SELECT item_id FROM skips WHERE annotator = ?",
                                             [annotator]).fetchall()}
        done_criteria: dict[str, set[str]] = {}
        for item_id, criterion in judged:
            done_criteria.setdefault(item_id, set()).add(criterion)
        done = 0
        pending: Task | None = None
        for item_id, a_on_left, prompt, media_a, media_b, kind in queue:
            visual, pf = criteria_for(kind)
            remaining = [c for c in visual + pf if c not in done_criteria.get(item_id, set())]
            if item_id in skipped or not remaining:
                done += 1
                continue
            if pending is None:
                left, right = (media_a, media_b) if a_on_left else (media_b, media_a)
                criterion = remaining[0]
                pending = Task(item_id, prompt, left, right, kind, bool(a_on_left), criterion,
                               1 if criterion in visual else 2, 0, len(queue))
        if pending is None:
            return None
        return Task(**{**pending.__dict__, "done": done})

    def progress(self, annotator: str) -> tuple[int, int]:
        task = self.next_task(annotator)
        if task is None:
            n = self._query("SELECT count(*) FROM assignments WHERE annotator = ?", [annotator])[0][0]
            return int(n), int(n)
        return task.done, task.total

    def assigned_items(self, annotator: str) -> list[str]:
        return [r[0] for r in self._query(
            "SELECT item_id FROM assignments WHERE annotator = ? ORDER BY position", [annotator])]

    def count_judgments(self, annotator: str | None = None) -> int:
        if annotator is None:
            return int(self._query("SELECT count(*) FROM judgments")[0][0])
        return int(self._query("SELECT count(*) FROM judgments WHERE annotator = ?", [annotator])[0][0])

    def judgments_frame(self) -> pd.DataFrame:
        """All judgments in A/B terms (model 1 = A) plus the raw side mapping and timestamps."""
        with self._connection() as con:
            return con.execute(
                "SELECT item_id, annotator, criterion, choice, choice_screen, a_on_left, created_at, seq "
                "FROM judgments ORDER BY seq").df()

    def golden_map(self) -> dict[str, tuple[str, str | None]]:
        return {r[0]: (r[1], r[2]) for r in self._query("SELECT item_id, golden, better FROM items "
                                                          "WHERE golden IS NOT NULL")}

    def coverage(self) -> dict[str, int]:
        """Distinct annotators with at least one judgment, per item (items without any get 0)."""
        return {r[0]: int(r[1]) for r in self._query(
            "SELECT i.item_id, count(DISTINCT j.annotator) FROM items i "
            "LEFT JOIN judgments j USING (item_id) GROUP BY i.item_id")}

    def export(self, path: str | Path) -> Path:
        """Write item_id, annotator, criterion, choice (A/B terms; n/a rows dropped) to CSV or Parquet, the
        format ``k5 sbs score`` reads."""
        path = Path(path)
        df = self.judgments_frame()
        df = df.loc[df["choice"] != NA, ["item_id", "annotator", "criterion", "choice"]]
        if path.suffix.lower() in (".parquet", ".pq"):
            df.to_parquet(path, index=False)
        else:
            df.to_csv(path, index=False)
        return path


def options_for(criterion: str) -> tuple[str, ...]:
    """The buttons shown for a criterion: the report's option set, plus "not applicable" for faces (criterion 8)."""
    base = allowed_choices(criterion)
    return base + (NA,) if criterion == "visual_8" else base

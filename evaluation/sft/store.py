"""DuckDB store of the SFT annotation (report §4.6): items, roles, Stage 1 / Stage 2 assignments and answers.

It is a ``JudgmentsStore`` (evaluation/sbs/judgments_store.py) with more tables: the same file discipline (opened per
operation, one transaction, retried while another process holds it, committed before the call returns, so a crash
loses nothing confirmed on screen) and the same logins (the ``annotators`` table, scrypt passwords). The default file
is ``K5_HOME/sft/judgments.duckdb``; SFT tables can also live in an SBS comparison's file.

Flow: items are assigned to ``stage1_overlap`` regular annotators. When the last of them finishes the screening of an
item, the store decides it in the same transaction (every screening question answered "yes" by at least
``stage1_min_yes`` of them) and, if it passed, assigns it to ``expert_overlap`` experts (least loaded first). An
expert therefore never receives an item that failed Stage 1, and a regular annotator never has Stage 2 work; both
rules are enforced on every read and write, not only in the UI.

Tables (besides the SBS ones)
  sft_roles(annotator PK, role)                                    role: regular | expert
  sft_items(item_id PK, kind, media_path, caption, domain, has_text, row_json)
  sft_assignments(annotator, item_id, stage, position)             PK (annotator, item_id, stage)
  sft_answers(seq, annotator, item_id, stage, criterion, answer, created_at)  PK (annotator, item_id, stage, criterion)
  sft_stage1(item_id PK, passed, decided_at)                       Stage 1 outcome, written once
  sft_settings(key PK, value)                                      stage1_overlap, stage1_min_yes, expert_overlap
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd

from evaluation.sbs.judgments_store import AlreadyJudged, InvalidJudgment, JudgmentsStore, NotAssigned, _utcnow
from evaluation.sft.questionnaire import EXPERT, REGULAR, ROLES, STAGE_EXPERT, STAGE_SCREENING, question, questions_for

_SFT_SCHEMA = """
CREATE TABLE IF NOT EXISTS sft_roles (annotator VARCHAR PRIMARY KEY, role VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS sft_items (
    item_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, media_path VARCHAR NOT NULL, caption VARCHAR,
    domain VARCHAR, has_text BOOLEAN NOT NULL, row_json VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS sft_assignments (
    annotator VARCHAR NOT NULL, item_id VARCHAR NOT NULL, stage INTEGER NOT NULL, position INTEGER NOT NULL,
    PRIMARY KEY (annotator, item_id, stage));
CREATE TABLE IF NOT EXISTS sft_answers (
    seq BIGINT NOT NULL, annotator VARCHAR NOT NULL, item_id VARCHAR NOT NULL, stage INTEGER NOT NULL,
    criterion VARCHAR NOT NULL, answer VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (annotator, item_id, stage, criterion));
CREATE TABLE IF NOT EXISTS sft_stage1 (item_id VARCHAR PRIMARY KEY, passed BOOLEAN NOT NULL, decided_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS sft_settings (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
"""

DEFAULT_SETTINGS = {"stage1_overlap": "1", "stage1_min_yes": "0.5", "expert_overlap": "3"}


class RoleRefused(PermissionError):
    """The annotator's role does not allow this stage (Stage 2 is for experts only)."""


@dataclass(frozen=True, kw_only=True)
class SftItem:
    """One item to annotate: a curated image or video scene."""

    item_id: str
    """``<media_id>#<scene_index>`` of the curated row."""
    kind: str
    """``image`` or ``video``."""
    media_path: str
    """Local path of the media file shown to annotators."""
    caption: str = ""
    """The curated caption (shown to experts as context)."""
    domain: str = "other"
    """The curated row's domain."""
    has_text: bool = False
    """Whether the text-in-image criteria are asked."""
    row: dict | None = None
    """The curated row's other fields, kept for the datasets (JSON-serialisable)."""


@dataclass(frozen=True)
class SftTask:
    """What an annotator does next in a stage: the item and its next unanswered criterion."""

    item_id: str
    kind: str
    media_path: str
    caption: str
    has_text: bool
    stage: int
    criterion: str
    index: int  # 0-based position of the criterion in the item's questionnaire
    count: int  # questions in the item's questionnaire
    done: int  # items of this stage finished by the annotator
    total: int  # items of this stage assigned to the annotator


def _require_role(annotator: str, role: str | None, stage: int) -> None:
    """Raise RoleRefused unless ``role`` may work on ``stage`` (Stage 2: experts only)."""
    if role is None:
        raise RoleRefused(f"{annotator!r} has no SFT role; an administrator assigns 'regular' or 'expert'")
    if stage == STAGE_EXPERT and role != EXPERT:
        raise RoleRefused(f"Stage 2 is for experts; {annotator!r} is a {role} annotator")


def _spread(name: str, item_id: str) -> str:
    # deterministic tie-break that differs per item, so equal loads do not always pick the same annotators
    return hashlib.sha1(f"{item_id}|{name}".encode()).hexdigest()


class SftStore(JudgmentsStore):
    """The SFT tables on a judgments file. Thread-safe, crash-safe (see module and ``JudgmentsStore`` docstrings)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        super().__init__(path, busy_timeout_s)
        with self._connection() as con:
            con.execute(_SFT_SCHEMA)
            for key, value in DEFAULT_SETTINGS.items():
                con.execute("INSERT INTO sft_settings VALUES (?, ?) ON CONFLICT DO NOTHING", [key, value])

    # --- set-up ---------------------------------------------------------------------------------------------------

    def configure(self, *, stage1_overlap: int, stage1_min_yes: float, expert_overlap: int) -> None:
        """Overlaps and the Stage 1 rule (items already decided keep their outcome and their experts)."""
        if stage1_overlap < 1 or expert_overlap < 1:
            raise ValueError(f"overlaps must be >= 1 (stage1_overlap={stage1_overlap}, "
                             f"expert_overlap={expert_overlap})")
        if not 0.0 < stage1_min_yes <= 1.0:
            raise ValueError(f"stage1_min_yes={stage1_min_yes} must be in (0, 1]")
        with self._connection() as con:
            for key, value in (("stage1_overlap", stage1_overlap), ("stage1_min_yes", stage1_min_yes),
                               ("expert_overlap", expert_overlap)):
                con.execute("INSERT OR REPLACE INTO sft_settings VALUES (?, ?)", [key, str(value)])

    def settings(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._query("SELECT key, value FROM sft_settings")}

    def set_role(self, annotator: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is unknown; use one of {ROLES}")
        with self._connection() as con:
            con.execute("INSERT OR REPLACE INTO sft_roles VALUES (?, ?)", [annotator, role])

    def role_of(self, annotator: str) -> str | None:
        rows = self._query("SELECT role FROM sft_roles WHERE annotator = ?", [annotator])
        return rows[0][0] if rows else None

    def annotators_with_role(self, role: str) -> list[str]:
        return [r[0] for r in self._query("SELECT annotator FROM sft_roles WHERE role = ? ORDER BY annotator",
                                          [role])]

    def add_items(self, items: Iterable[SftItem]) -> int:
        """Insert items (idempotent: items already there are kept as they are); returns the number added."""
        added = 0
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                for it in items:
                    if it.kind not in ("image", "video"):
                        raise ValueError(f"item {it.item_id!r}: kind {it.kind!r} is not image or video")
                    before = con.execute("SELECT count(*) FROM sft_items").fetchone()[0]
                    con.execute("INSERT INTO sft_items VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                [it.item_id, it.kind, it.media_path, it.caption, it.domain, it.has_text,
                                 json.dumps(it.row or {}, default=str)])
                    added += con.execute("SELECT count(*) FROM sft_items").fetchone()[0] - before
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return added

    def assign_screening(self) -> int:
        """Give every item fewer than ``stage1_overlap`` screeners more regular annotators, least loaded first
        (idempotent). Returns the assignments written."""
        written = 0
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                regulars = [r[0] for r in con.execute(
                    "SELECT annotator FROM sft_roles WHERE role = ? ORDER BY annotator", [REGULAR]).fetchall()]
                if not regulars:
                    raise ValueError("no regular annotators: add some with set_role(name, 'regular') first")
                overlap = int(float(self._setting(con, "stage1_overlap")))
                if overlap > len(regulars):
                    raise ValueError(f"stage1_overlap={overlap} needs at least that many regular annotators, "
                                     f"have {len(regulars)}")
                items = [r[0] for r in con.execute("SELECT item_id FROM sft_items ORDER BY item_id").fetchall()]
                for item_id in items:
                    written += self._assign(con, item_id, STAGE_SCREENING, regulars, overlap)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return written

    def add_to_queue(self, annotator: str, stage: int) -> int:
        """Queue every eligible item the annotator does not have yet, beyond the overlap (a new expert rating the
        items already passed, a demo account): Stage 1 all items, Stage 2 the items that passed Stage 1. Decided
        screenings stay decided. Returns the assignments written."""
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                self._check_role(con, annotator, stage)
                eligible = ("SELECT item_id FROM sft_items" if stage == STAGE_SCREENING
                            else "SELECT item_id FROM sft_stage1 WHERE passed")
                rows = con.execute(f"SELECT item_id FROM ({eligible}) WHERE item_id NOT IN (SELECT item_id FROM "
                                   "sft_assignments WHERE annotator = ? AND stage = ?) ORDER BY item_id",
                                   [annotator, stage]).fetchall()
                start = con.execute("SELECT count(*) FROM sft_assignments WHERE annotator = ? AND stage = ?",
                                    [annotator, stage]).fetchone()[0]
                for k, (item_id,) in enumerate(rows):
                    con.execute("INSERT INTO sft_assignments VALUES (?, ?, ?, ?)", [annotator, item_id, stage,
                                                                                    int(start) + k])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return len(rows)

    @staticmethod
    def _setting(con: duckdb.DuckDBPyConnection, key: str) -> str:
        return con.execute("SELECT value FROM sft_settings WHERE key = ?", [key]).fetchone()[0]

    @staticmethod
    def _assign(con: duckdb.DuckDBPyConnection, item_id: str, stage: int, pool: list[str], overlap: int) -> int:
        have = {r[0] for r in con.execute("SELECT annotator FROM sft_assignments WHERE item_id = ? AND stage = ?",
                                          [item_id, stage]).fetchall()}
        load = dict(con.execute("SELECT annotator, count(*) FROM sft_assignments WHERE stage = ? GROUP BY annotator",
                                [stage]).fetchall())
        free = sorted((a for a in pool if a not in have), key=lambda a: (load.get(a, 0), _spread(a, item_id)))
        picked = free[:max(0, overlap - len(have))]
        for name in picked:
            con.execute("INSERT INTO sft_assignments VALUES (?, ?, ?, ?)",
                        [name, item_id, stage, int(load.get(name, 0))])
        return len(picked)

    # --- writes ---------------------------------------------------------------------------------------------------

    def answer(self, annotator: str, item_id: str, stage: int, criterion: str, answer: str) -> int:
        """Store one answer; returns its seq once committed. A screening answer that completes an item decides it
        (and assigns experts if it passed) in the same transaction. Raises RoleRefused, NotAssigned,
        InvalidJudgment or AlreadyJudged; nothing is written then."""
        return self.answer_many([(annotator, item_id, stage, criterion, answer)], skip_existing=False)[-1]

    def answer_many(self, rows: Iterable[tuple[str, str, int, str, str]], skip_existing: bool = True) -> list[int]:
        """Bulk ``answer`` in one transaction, all or nothing (e.g. simulated annotators); with ``skip_existing``
        answers already given are left as they are. Returns the seqs written."""
        rows = [(a, i, int(st), c, ans) for a, i, st, c, ans in rows]
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                accepted, n_questions = self._validate(con, rows, skip_existing)
                seqs = [int(r[0]) for r in con.execute(
                    "SELECT nextval('action_seq') FROM range(?)", [len(accepted)]).fetchall()] if accepted else []
                now = _utcnow()
                if accepted:
                    # one set-based insert: executemany runs a statement per row
                    frame = pd.DataFrame([(seq, *row, now) for seq, row in zip(seqs, accepted)],
                                         columns=["seq", "annotator", "item_id", "stage", "criterion", "answer",
                                                  "created_at"])
                    con.register("new_answers", frame)
                    con.execute("INSERT INTO sft_answers SELECT * FROM new_answers")
                    con.unregister("new_answers")
                for item_id in sorted({r[1] for r in accepted if r[2] == STAGE_SCREENING}):
                    self._decide_screening(con, item_id, n_questions[item_id])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return seqs

    def _validate(self, con: duckdb.DuckDBPyConnection, rows: list[tuple[str, str, int, str, str]],
                  skip_existing: bool) -> tuple[list[tuple[str, str, int, str, str]], dict[str, int]]:
        """The rows to insert, checked against roles, assignments, questionnaires and answers already given
        (loaded once per transaction), and the screening questionnaire length of their items. Raises on the first
        refused row."""
        names = sorted({r[0] for r in rows})
        if not names:
            return [], {}
        marks = ", ".join("?" * len(names))
        roles = dict(con.execute(f"SELECT annotator, role FROM sft_roles WHERE annotator IN ({marks})",
                                 names).fetchall())
        assigned = {(a, i, int(st)): (kind, bool(text)) for a, i, st, kind, text in con.execute(
            "SELECT a.annotator, a.item_id, a.stage, i.kind, i.has_text FROM sft_assignments a "
            f"JOIN sft_items i USING (item_id) WHERE a.annotator IN ({marks})", names).fetchall()}
        existing = {(a, i, int(st), c) for a, i, st, c in con.execute(
            f"SELECT annotator, item_id, stage, criterion FROM sft_answers WHERE annotator IN ({marks})",
            names).fetchall()}
        n_questions: dict[str, int] = {}
        accepted = []
        for annotator, item_id, stage, criterion, ans in rows:
            _require_role(annotator, roles.get(annotator), stage)
            item = assigned.get((annotator, item_id, stage))
            if item is None:
                raise NotAssigned(f"{item_id!r} is not assigned to {annotator!r} in stage {stage}")
            keys = [q.key for q in questions_for(stage, item[0], item[1])]
            if stage == STAGE_SCREENING:
                n_questions[item_id] = len(keys)
            if criterion not in keys:
                raise InvalidJudgment(f"{criterion!r} is not asked in stage {stage} for this {item[0]}")
            if ans not in question(criterion).options:
                raise InvalidJudgment(f"{ans!r} is not an option of {criterion!r} ({question(criterion).options})")
            if (annotator, item_id, stage, criterion) in existing:
                if skip_existing:
                    continue
                raise AlreadyJudged(f"{annotator!r} already answered {criterion!r} of {item_id!r}")
            existing.add((annotator, item_id, stage, criterion))
            accepted.append((annotator, item_id, stage, criterion, ans))
        return accepted, n_questions

    def _check_role(self, con: duckdb.DuckDBPyConnection, annotator: str, stage: int) -> None:
        row = con.execute("SELECT role FROM sft_roles WHERE annotator = ?", [annotator]).fetchone()
        _require_role(annotator, None if row is None else row[0], stage)

    def _decide_screening(self, con: duckdb.DuckDBPyConnection, item_id: str, n_questions: int) -> None:
        """Once every screener finished the item: record pass/fail; a pass assigns experts."""
        if con.execute("SELECT 1 FROM sft_stage1 WHERE item_id = ?", [item_id]).fetchone():
            return
        screeners = [r[0] for r in con.execute("SELECT annotator FROM sft_assignments WHERE item_id = ? AND stage = ?",
                                               [item_id, STAGE_SCREENING]).fetchall()]
        answers = con.execute("SELECT annotator, criterion, answer FROM sft_answers WHERE item_id = ? AND stage = ?",
                              [item_id, STAGE_SCREENING]).fetchall()
        if len(answers) < n_questions * len(screeners):
            return
        min_yes = float(self._setting(con, "stage1_min_yes"))
        by_criterion: dict[str, list[bool]] = {}
        for _, criterion, ans in answers:
            by_criterion.setdefault(criterion, []).append(ans in question(criterion).good)
        passed = all(sum(v) / len(v) >= min_yes for v in by_criterion.values())
        con.execute("INSERT INTO sft_stage1 VALUES (?, ?, ?)", [item_id, passed, _utcnow()])
        if passed:
            experts = [r[0] for r in con.execute(
                "SELECT annotator FROM sft_roles WHERE role = ? ORDER BY annotator", [EXPERT]).fetchall()]
            overlap = int(float(self._setting(con, "expert_overlap")))
            if len(experts) < overlap:
                raise ValueError(f"expert_overlap={overlap} needs at least that many experts, have {len(experts)}; "
                                 "add experts before screening")
            self._assign(con, item_id, STAGE_EXPERT, experts, overlap)

    def undo_last(self, annotator: str) -> tuple[str, int, str] | None:  # type: ignore[override]
        """Remove the annotator's latest SFT answer: (item_id, stage, criterion), or None when there is none.
        A screening answer of an item already decided stays (experts may be working on it)."""
        with self._connection() as con:
            con.execute("BEGIN")
            try:
                row = con.execute("SELECT seq, item_id, stage, criterion FROM sft_answers WHERE annotator = ? "
                                  "ORDER BY seq DESC LIMIT 1", [annotator]).fetchone()
                if row is not None:
                    if row[2] == STAGE_SCREENING and con.execute(
                            "SELECT 1 FROM sft_stage1 WHERE item_id = ?", [row[1]]).fetchone():
                        raise AlreadyJudged(f"the screening of {row[1]!r} is already decided; it cannot be undone")
                    con.execute("DELETE FROM sft_answers WHERE annotator = ? AND seq = ?", [annotator, row[0]])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return None if row is None else (row[1], int(row[2]), row[3])

    # --- reads ----------------------------------------------------------------------------------------------------

    def next_sft_task(self, annotator: str, stage: int) -> SftTask | None:
        """The first item of the annotator's own queue for ``stage`` with an unanswered criterion (resume point), or
        None when that queue is finished. Raises RoleRefused for Stage 2 unless the annotator is an expert."""
        with self._connection() as con:
            self._check_role(con, annotator, stage)
            queue = con.execute(
                "SELECT a.item_id, i.kind, i.media_path, i.caption, i.has_text FROM sft_assignments a "
                "JOIN sft_items i USING (item_id) WHERE a.annotator = ? AND a.stage = ? ORDER BY a.position, "
                "a.item_id", [annotator, stage]).fetchall()
            answered = con.execute("SELECT item_id, criterion FROM sft_answers WHERE annotator = ? AND stage = ?",
                                   [annotator, stage]).fetchall()
        done_keys: dict[str, set[str]] = {}
        for item_id, criterion in answered:
            done_keys.setdefault(item_id, set()).add(criterion)
        done, pending = 0, None
        for item_id, kind, media_path, caption, has_text in queue:
            keys = [q.key for q in questions_for(stage, kind, bool(has_text))]
            remaining = [k for k in keys if k not in done_keys.get(item_id, set())]
            if not remaining:
                done += 1
            elif pending is None:
                pending = (item_id, kind, media_path, caption or "", bool(has_text), remaining[0],
                           keys.index(remaining[0]), len(keys))
        if pending is None:
            return None
        return SftTask(*pending[:5], stage, *pending[5:], done, len(queue))

    def sft_progress(self, annotator: str, stage: int) -> tuple[int, int]:
        task = self.next_sft_task(annotator, stage)
        if task is not None:
            return task.done, task.total
        n = self._query("SELECT count(*) FROM sft_assignments WHERE annotator = ? AND stage = ?", [annotator, stage])
        return int(n[0][0]), int(n[0][0])

    def assigned(self, annotator: str, stage: int) -> list[str]:
        return [r[0] for r in self._query("SELECT item_id FROM sft_assignments WHERE annotator = ? AND stage = ? "
                                          "ORDER BY position, item_id", [annotator, stage])]

    def stage1_outcomes(self) -> dict[str, bool]:
        return {r[0]: bool(r[1]) for r in self._query("SELECT item_id, passed FROM sft_stage1")}

    def items_frame(self) -> pd.DataFrame:
        with self._connection() as con:
            return con.execute("SELECT i.*, s.passed AS stage1_passed FROM sft_items i "
                               "LEFT JOIN sft_stage1 s USING (item_id) ORDER BY item_id").df()

    def answers_frame(self, stage: int | None = None) -> pd.DataFrame:
        """All answers (item_id, annotator, stage, criterion, answer, created_at, seq), optionally of one stage."""
        where, params = ("WHERE stage = ?", [stage]) if stage is not None else ("", [])
        with self._connection() as con:
            return con.execute("SELECT item_id, annotator, stage, criterion, answer, created_at, seq FROM sft_answers "
                               f"{where} ORDER BY seq", params).df()

    def expert_assignments(self) -> dict[str, list[str]]:
        """item_id -> experts assigned to it."""
        out: dict[str, list[str]] = {}
        for item_id, name in self._query("SELECT item_id, annotator FROM sft_assignments WHERE stage = ? "
                                         "ORDER BY annotator", [STAGE_EXPERT]):
            out.setdefault(item_id, []).append(name)
        return out

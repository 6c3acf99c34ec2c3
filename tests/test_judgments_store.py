"""JudgmentsStore on real DuckDB files: side mapping, refusals, undo, resume, crash durability, threads."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from evaluation.sbs.judgments_store import (
    AlreadyJudged,
    InvalidJudgment,
    JudgmentsStore,
    NotAssigned,
    hash_password,
    verify_password,
)
from evaluation.sbs.sbs_plan import Assignment, Plan, PlanItem, criteria_for
from evaluation.sbs.sbs_scores import score_judgments

REPO = Path(__file__).resolve().parents[1]


def small_plan() -> Plan:
    items = [PlanItem("v1", "a cat", "v1_a.mp4", "v1_b.mp4"), PlanItem("v2", "a dog", "v2_a.mp4", "v2_b.mp4"),
             PlanItem("im", "a cup", "im_a.png", "im_b.png", kind="image")]
    assignments = [Assignment("ann1", "v1", True, 0), Assignment("ann1", "v2", False, 1),
                   Assignment("ann2", "v1", False, 0), Assignment("ann2", "im", True, 1)]
    return Plan(items, assignments, overlap=2, seed=0)


@pytest.fixture()
def store(tmp_path: Path) -> JudgmentsStore:
    s = JudgmentsStore(tmp_path / "j.duckdb")
    s.load_plan(small_plan())
    yield s
    s.close()


def test_side_mapping_and_timestamps(store: JudgmentsStore) -> None:
    store.record("ann1", "v1", "visual_1", "model1_better")  # A on the left: left = A
    store.record("ann2", "v1", "visual_1", "model1_better")  # A on the right: left = B
    df = store.judgments_frame().set_index("annotator")
    assert df.loc["ann1", "choice"] == "model1_better" and bool(df.loc["ann1", "a_on_left"]) is True
    assert df.loc["ann2", "choice"] == "model2_better" and df.loc["ann2", "choice_screen"] == "model1_better"
    assert df["created_at"].notna().all()
    # one A vote, one B vote -> .5 / .5 after mapping back
    assert score_judgments(df.reset_index())["criteria"]["visual_1"] == {"model1": 0.5, "model2": 0.5}


def test_refusals_write_nothing(store: JudgmentsStore) -> None:
    with pytest.raises(NotAssigned):
        store.record("ann2", "v2", "visual_1", "equally")  # v2 belongs to ann1 only
    with pytest.raises(NotAssigned):
        store.record("nobody", "v1", "visual_1", "equally")
    with pytest.raises(InvalidJudgment):
        store.record("ann1", "v1", "visual_1", "both_correct")  # not an option of criteria 1-9
    with pytest.raises(InvalidJudgment):
        store.record("ann1", "v1", "visual_12", "equally")
    with pytest.raises(InvalidJudgment):
        store.record("ann2", "im", "visual_6", "equally")  # dynamism is not asked for images
    with pytest.raises(NotAssigned):
        store.skip("ann2", "v2", "broken video")
    assert store.count_judgments() == 0
    store.record("ann1", "v1", "visual_8", "not_applicable")  # faces absent
    with pytest.raises(AlreadyJudged):
        store.record("ann1", "v1", "visual_8", "equally")
    assert store.count_judgments() == 1


def test_undo_only_touches_own_latest_action(store: JudgmentsStore) -> None:
    store.record("ann1", "v1", "visual_1", "equally")
    store.record("ann1", "v1", "visual_2", "equally")
    store.record("ann2", "v1", "visual_1", "equally")  # later, but another annotator's
    assert store.undo_last("ann1") == ("judgment", "v1", "visual_2")
    assert store.count_judgments("ann1") == 1 and store.count_judgments("ann2") == 1
    store.skip("ann1", "v2", "video does not play")
    assert store.next_task("ann1").item_id == "v1"
    assert store.undo_last("ann1") == ("skip", "v2", None)
    assert store.undo_last("ann1") == ("judgment", "v1", "visual_1")
    assert store.undo_last("ann1") is None
    assert store.count_judgments("ann2") == 1


def test_resume_order_phases_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "j.duckdb"
    with JudgmentsStore(path) as s:
        s.load_plan(small_plan())
        t = s.next_task("ann1")
        assert (t.item_id, t.criterion, t.phase, t.done, t.total) == ("v1", "visual_1", 1, 0, 2)
        assert (t.left, t.right) == ("v1_a.mp4", "v1_b.mp4")
        visual, pf = criteria_for("video")
        for c in visual:
            s.record("ann1", "v1", c, "equally")
        assert (s.next_task("ann1").criterion, s.next_task("ann1").phase) == (pf[0], 2)
        s.record("ann1", "v1", pf[0], "both_correct")
    with JudgmentsStore(path) as s:  # a restart resumes exactly there
        s.load_plan(small_plan())  # idempotent
        assert s.next_task("ann1").criterion == pf[1]
        for c in pf[1:]:
            s.record("ann1", "v1", c, "both_incorrect")
        t = s.next_task("ann1")
        assert (t.item_id, t.criterion, t.done, t.a_on_left) == ("v2", "visual_1", 1, False)
        assert (t.left, t.right) == ("v2_b.mp4", "v2_a.mp4")  # A on the right
        s.skip("ann1", "v2", "blank video")
        assert s.next_task("ann1") is None and s.progress("ann1") == (2, 2)
        # image pairs skip the temporal criteria
        assert s.next_task("ann2").item_id == "v1"
        assert len(criteria_for("image")[0]) == 6


_CRASH_WRITER = """
import os, signal, sys
from evaluation.sbs.judgments_store import JudgmentsStore
from evaluation.sbs.sbs_plan import criteria_for
s = JudgmentsStore(sys.argv[1])
for c in criteria_for("video")[0][:7]:
    s.record("ann1", "v1", c, "model1_better")
    print(c, flush=True)  # "confirmed on screen" only after record() returned
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no checkpoint
"""


def test_confirmed_judgments_survive_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "j.duckdb"
    with JudgmentsStore(path) as s:
        s.load_plan(small_plan())
    proc = subprocess.run([sys.executable, "-c", _CRASH_WRITER, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9
    confirmed = proc.stdout.split()
    assert len(confirmed) == 7
    with JudgmentsStore(path) as s:
        df = s.judgments_frame()
        assert sorted(df["criterion"]) == sorted(confirmed)


def test_concurrent_threads_lose_nothing_and_never_overwrite(tmp_path: Path) -> None:
    annotators = [f"ann{k}" for k in range(8)]
    items = [PlanItem(f"p{k}", "x", "a.mp4", "b.mp4") for k in range(3)]
    assignments = [Assignment(a, i.item_id, (k + n) % 2 == 0, n)
                   for k, a in enumerate(annotators) for n, i in enumerate(items)]
    with JudgmentsStore(tmp_path / "j.duckdb") as s:
        s.load_plan(Plan(items, assignments, overlap=8, seed=0))
        confirmed: list[tuple[str, str, str]] = []
        refused: list[str] = []
        guard = threading.Lock()
        barrier = threading.Barrier(len(annotators) * 2)

        def work(annotator: str, choice: str) -> None:
            barrier.wait()  # start together for maximum contention
            for item in items:
                for c in criteria_for("video")[0]:
                    try:
                        s.record(annotator, item.item_id, c, choice)
                    except AlreadyJudged:
                        with guard:
                            refused.append(annotator)
                        continue
                    with guard:
                        confirmed.append((annotator, item.item_id, c))

        # two threads per annotator (like two browser tabs) race on the very same rows
        threads = [threading.Thread(target=work, args=(a, ch)) for a in annotators
                   for ch in ("model1_better", "model2_better")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        df = s.judgments_frame()
        per_annotator = 3 * 11
        assert len(confirmed) == len(df) == per_annotator * len(annotators)
        assert len(refused) == per_annotator * len(annotators)  # each race lost exactly once
        assert set(map(tuple, df[["annotator", "item_id", "criterion"]].values)) == set(confirmed)


def test_password_hashing(store: JudgmentsStore) -> None:
    h1, h2 = hash_password("s3cret"), hash_password("s3cret")
    assert h1 != h2 and "s3cret" not in h1  # per-user salt, never the clear text
    assert verify_password("s3cret", h1) and not verify_password("wrong", h1)
    assert not verify_password("s3cret", "plain-text")
    store.set_password("ann1", "pw1")
    assert store.check_password("ann1", "pw1") and not store.check_password("ann1", "pw2")
    assert not store.check_password("ghost", "pw1")


_HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])  # another process (the app, a report, an export) in the middle of an operation
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_processes_take_turns_on_the_file_and_a_long_lock_is_named(tmp_path: Path) -> None:
    import time

    from evaluation.sbs.judgments_store import StoreBusy

    path = tmp_path / "j.duckdb"
    store = JudgmentsStore(path, busy_timeout_s=0.5)
    store.load_plan(small_plan())
    holder = _hold(path, 60)
    try:
        with pytest.raises(StoreBusy, match="locked by another process"):
            store.record("ann1", "v1", "visual_1", "model1_better")
    finally:
        holder.kill()
        holder.wait()
    assert store.count_judgments() == 0  # nothing half-written
    # a short lock is waited out: the write lands once the other process lets go
    store.busy_timeout_s = 60
    holder = _hold(path, 1.5)
    t0 = time.monotonic()
    store.record("ann1", "v1", "visual_1", "model1_better")
    assert time.monotonic() - t0 > 0.5 and holder.wait(timeout=30) == 0
    assert store.count_judgments("ann1") == 1
    # the store keeps nothing open between operations: another process can read right away
    read = subprocess.run([sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1], read_only=True);"
                           "print(c.execute('SELECT count(*) FROM judgments').fetchone()[0])", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert read.stdout.strip() == "1", read.stderr


def test_record_many_is_all_or_nothing_and_keeps_existing_rows(store: JudgmentsStore) -> None:
    store.record("ann1", "v1", "visual_1", "model2_better")
    rows = [("ann1", "v1", "visual_1", "model1_better"), ("ann1", "v1", "visual_2", "equally")]
    assert store.record_many(rows) == 1  # visual_1 was already judged: kept as it was
    assert store.judgments_frame().set_index("criterion").loc["visual_1", "choice_screen"] == "model2_better"
    with pytest.raises(NotAssigned):
        store.record_many([("ann1", "v1", "visual_3", "equally"), ("ann2", "v2", "visual_1", "equally")])
    assert store.count_judgments() == 2  # the refused batch wrote nothing


def test_answer_stores_only_the_current_question_and_reports_what_was_saved(store: JudgmentsStore) -> None:
    """The app's one-operation press: stored only when (item, criterion) is what the screen should show."""
    first = store.next_task("ann1")
    done = store.answer("ann1", first.item_id, first.criterion, "model1_better")
    assert done.saved and done.task.criterion != first.criterion and store.count_judgments("ann1") == 1
    again = store.answer("ann1", first.item_id, first.criterion, "model1_better")  # a second press, stale screen
    assert not again.saved and again.previous == "model1_better" and again.task == done.task
    ahead = criteria_for("video")[1][0]  # a later question of the same pair: not what the screen showed
    skipped_ahead = store.answer("ann1", first.item_id, ahead, "model1_better")
    assert not skipped_ahead.saved and skipped_ahead.previous is None and store.count_judgments("ann1") == 1
    other = store.answer("ann1", "im", "visual_1", "model1_better")  # ann2's pair: never written for ann1
    assert not other.saved and other.previous is None and store.count_judgments("ann1") == 1
    with pytest.raises(InvalidJudgment):  # a choice the current question does not offer
        store.answer("ann1", done.task.item_id, done.task.criterion, "both_incorrect")

"""SFT store (report §4.6): roles, Stage 1 -> Stage 2 promotion, expert overlap, per-annotator isolation,
all-or-nothing writes, crash safety, undo, and a batch made from a real curated dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_curated_dataset

from evaluation.sbs.judgments_store import AlreadyJudged, InvalidJudgment, NotAssigned
from evaluation.sft.batch import SftBatchConfig, create_batch
from evaluation.sft.questionnaire import IMAGE_CRITERIA, STAGE1, TEXT_CRITERIA, VIDEO_CRITERIA
from evaluation.sft.store import RoleRefused, SftItem, SftStore
from k5data.curation.config import load_config
from k5data.curation.output import read_dataset

REPO = Path(__file__).resolve().parents[1]


def screen(store: SftStore, annotator: str, item_id: str, verdict: str = "yes") -> None:
    store.answer_many([(annotator, item_id, 1, q.key, verdict) for q in STAGE1], skip_existing=False)


def small_store(path: Path, n_items: int = 4, stage1_overlap: int = 1, min_yes: float = 0.5,
                experts: int = 4, overlap: int = 3) -> SftStore:
    store = SftStore(path)
    for name in ("reg_a", "reg_b"):
        store.set_role(name, "regular")
    for k in range(experts):
        store.set_role(f"exp_{k}", "expert")
    store.configure(stage1_overlap=stage1_overlap, stage1_min_yes=min_yes, expert_overlap=overlap)
    store.add_items(SftItem(item_id=f"i{k}", kind="image", media_path=f"/m/{k}.png", has_text=k == 0)
                    for k in range(n_items))
    store.assign_screening()
    return store


def test_roles_gate_stage2_and_failed_items_never_reach_experts(tmp_path: Path) -> None:
    store = small_store(tmp_path / "j.duckdb")
    queues = {name: store.assigned(name, 1) for name in ("reg_a", "reg_b")}
    assert sorted(queues["reg_a"] + queues["reg_b"]) == ["i0", "i1", "i2", "i3"]  # overlap 1, balanced
    assert all(len(q) == 2 for q in queues.values())
    with pytest.raises(RoleRefused, match="Stage 2 is for experts"):
        store.next_sft_task("reg_a", 2)
    with pytest.raises(RoleRefused, match="no SFT role"):
        store.next_sft_task("stranger", 1)
    assert all(store.next_sft_task(f"exp_{k}", 2) is None for k in range(4))  # nothing screened yet
    first, second = queues["reg_a"]
    screen(store, "reg_a", first, "yes")
    store.answer_many([("reg_a", second, 1, q.key, "no" if q.key == "no_artifacts" else "yes") for q in STAGE1])
    assert store.stage1_outcomes() == {first: True, second: False}
    experts = store.expert_assignments()
    assert list(experts) == [first] and len(set(experts[first])) == 3  # overlap from config, distinct experts
    for k in range(4):
        seen = store.assigned(f"exp_{k}", 2)
        assert second not in seen
        with pytest.raises(NotAssigned):
            store.answer(f"exp_{k}", second, 2, IMAGE_CRITERIA[0].key, "good")
    expert = experts[first][0]
    task = store.next_sft_task(expert, 2)
    assert (task.item_id, task.criterion, task.stage) == (first, IMAGE_CRITERIA[0].key, 2)
    with pytest.raises(RoleRefused):
        store.answer("reg_a", first, 2, IMAGE_CRITERIA[0].key, "good")


def test_expert_load_is_balanced_and_text_items_get_text_criteria(tmp_path: Path) -> None:
    store = small_store(tmp_path / "j.duckdb", n_items=8)
    for name in ("reg_a", "reg_b"):
        for item in store.assigned(name, 1):
            screen(store, name, item)
    loads = [len(store.assigned(f"exp_{k}", 2)) for k in range(4)]
    assert sum(loads) == 8 * 3 and max(loads) - min(loads) <= 1
    one = small_store(tmp_path / "one.duckdb", n_items=1)  # i0 alone: it heads its experts' queues
    screen(one, "reg_a" if one.assigned("reg_a", 1) else "reg_b", "i0")
    expert = one.expert_assignments()["i0"][0]
    keys = []
    while (task := one.next_sft_task(expert, 2)) is not None:
        keys.append(task.criterion)
        one.answer(expert, task.item_id, 2, task.criterion, store_option(task.criterion))
    assert keys == [q.key for q in IMAGE_CRITERIA + TEXT_CRITERIA]  # i0 has text: 11 + 5 questions


def store_option(key: str) -> str:
    from evaluation.sft.questionnaire import question

    return question(key).options[0]


def test_stage1_overlap_rule_decides_both_ways(tmp_path: Path) -> None:
    strict = small_store(tmp_path / "a.duckdb", n_items=2, stage1_overlap=2, min_yes=1.0)
    screen(strict, "reg_a", "i0", "yes")
    assert strict.stage1_outcomes() == {}  # undecided until every screener finished
    screen(strict, "reg_b", "i0", "no")
    screen(strict, "reg_a", "i1", "yes")
    screen(strict, "reg_b", "i1", "yes")
    assert strict.stage1_outcomes() == {"i0": False, "i1": True}
    lenient = small_store(tmp_path / "b.duckdb", n_items=1, stage1_overlap=2, min_yes=0.5)
    screen(lenient, "reg_a", "i0", "yes")
    screen(lenient, "reg_b", "i0", "no")
    assert lenient.stage1_outcomes() == {"i0": True}


def test_isolation_validation_and_all_or_nothing(tmp_path: Path) -> None:
    store = small_store(tmp_path / "j.duckdb")
    mine, theirs = store.assigned("reg_a", 1)[0], store.assigned("reg_b", 1)[0]
    with pytest.raises(NotAssigned):
        store.answer("reg_a", theirs, 1, "depth", "yes")
    with pytest.raises(InvalidJudgment, match="not an option"):
        store.answer("reg_a", mine, 1, "depth", "maybe")
    with pytest.raises(InvalidJudgment, match="not asked"):
        store.answer("reg_a", mine, 1, "vid_dynamics", "high")
    store.answer("reg_a", mine, 1, "depth", "yes")
    with pytest.raises(AlreadyJudged):
        store.answer("reg_a", mine, 1, "depth", "no")
    with pytest.raises(NotAssigned):  # the second row is refused: the first is not written either
        store.answer_many([("reg_a", mine, 1, "framing", "yes"), ("reg_a", theirs, 1, "framing", "yes")])
    assert list(store.answers_frame()["criterion"]) == ["depth"]
    assert store.next_sft_task("reg_a", 1).criterion == "main_object"  # resume at the first unanswered question
    assert store.next_sft_task("reg_b", 1).item_id == theirs  # reg_b's queue is untouched


def test_undo(tmp_path: Path) -> None:
    store = small_store(tmp_path / "j.duckdb", n_items=2)
    item = store.assigned("reg_a", 1)[0]
    store.answer("reg_a", item, 1, "main_object", "no")
    assert store.undo_last("reg_a") == (item, 1, "main_object")
    assert store.undo_last("reg_a") is None
    screen(store, "reg_a", item)
    with pytest.raises(AlreadyJudged, match="already decided"):
        store.undo_last("reg_a")
    expert = store.expert_assignments()[item][0]
    store.answer(expert, item, 2, IMAGE_CRITERIA[0].key, "bad")
    assert store.undo_last(expert) == (item, 2, IMAGE_CRITERIA[0].key)


def test_confirmed_answers_survive_a_killed_process(tmp_path: Path) -> None:
    db = tmp_path / "j.duckdb"
    store = small_store(db)
    item = store.assigned("reg_a", 1)[0]
    code = (f"import os; from evaluation.sft.store import SftStore; s = SftStore({str(db)!r}); "
            f"s.answer('reg_a', {item!r}, 1, 'depth', 'yes'); os._exit(9)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert list(SftStore(db).answers_frame()["criterion"]) == ["depth"]


def test_batch_from_a_curated_dataset(tmp_path: Path) -> None:
    curated = read_dataset(str(write_curated_dataset(tmp_path)), load_config())
    store = SftStore(tmp_path / "sft" / "judgments.duckdb")
    cfg = SftBatchConfig(regular_annotators=["r1"], experts=["e1", "e2", "e3"], max_items=10)
    summary = create_batch(store, curated, tmp_path / "sft" / "media", cfg)
    assert summary == {"items": 3, "new_items": 3, "new_stage1_assignments": 3}
    items = store.items_frame().set_index("item_id")
    assert sorted(items.index) == ["m0#0", "m1#0", "m3#0"]  # the rejected row is not offered
    assert bool(items.loc["m1#0", "has_text"]) and not bool(items.loc["m0#0", "has_text"])
    for path in items["media_path"]:
        assert Path(path).is_file() and "img" not in Path(path).name and "clip" not in Path(path).name
    assert create_batch(store, curated, tmp_path / "sft" / "media", cfg)["new_stage1_assignments"] == 0
    task = store.next_sft_task("r1", 1)
    assert task.item_id == "m0#0"  # best aesthetic score first
    assert [q.key for q in VIDEO_CRITERIA][0] == "vid_integrity"
    with pytest.raises(ValueError, match="both as regular annotators and experts"):
        SftBatchConfig(regular_annotators=["x"], experts=["x", "y", "z"])
    empty = SftStore(tmp_path / "empty.duckdb")  # nothing passed curation: an empty batch, not a failed run
    assert create_batch(empty, curated.assign(passed=False), tmp_path / "m2", cfg) == {
        "items": 0, "new_items": 0, "new_stage1_assignments": 0}

"""SFT consensus (report §4.6): v1 ⊆ v2 and sizes that follow the thresholds on seeded simulated judgments,
Krippendorff's alpha against the published worked example, the v1/v2 sampling mix."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from evaluation.sft.consensus import ConsensusConfig, agreement_by_criterion, item_consensus, krippendorff_alpha_nominal
from evaluation.sft.datasets import MixConfig, build_versions, consensus_table, mix_table, write_mix
from evaluation.sft.questionnaire import (
    IMAGE_CRITERIA,
    STAGE1,
    TEXT_CRITERIA,
    VIDEO_CRITERIA,
    consensus_questions,
    question,
)
from evaluation.sft.simulate import SimulatedRaters, simulate_annotation, simulated_answer
from evaluation.sft.store import SftItem, SftStore

EXPERTS = [f"simulated:expert_{k}" for k in range(5)]


def make_store(path: Path, n_items: int = 48, seed: int = 7) -> SftStore:
    store = SftStore(path)
    for name in ("simulated:screener_a", "simulated:screener_b"):
        store.set_role(name, "regular")
    for name in EXPERTS:
        store.set_role(name, "expert")
    store.configure(stage1_overlap=2, stage1_min_yes=0.5, expert_overlap=3)
    store.add_items(SftItem(item_id=f"m{i:03d}#0", kind="video" if i % 3 == 0 else "image", media_path=f"/m/{i}",
                            caption=f"caption {i}", domain=["people", "nature", "animals"][i % 3],
                            has_text=i % 5 == 1, row={"media_id": f"m{i:03d}", "scene_index": 0})
                    for i in range(n_items))
    store.assign_screening()
    simulate_annotation(store, SimulatedRaters(seed=seed))
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SftStore:
    return make_store(tmp_path_factory.mktemp("sft") / "judgments.duckdb")


def test_questionnaires_have_the_reports_criteria() -> None:
    assert (len(STAGE1), len(IMAGE_CRITERIA), len(VIDEO_CRITERIA), len(TEXT_CRITERIA)) == (4, 11, 13, 5)
    assert len(consensus_questions("image", has_text=True)) == 11 + 4  # poster category is descriptive
    assert len(consensus_questions("video")) == 13 - 2  # dynamics and complexity are descriptive
    with pytest.raises(ValueError, match="no questionnaire"):
        consensus_questions("audio")


def reference_membership(store: SftStore, min_experts: int, min_good: float, max_failed: int) -> set[str]:
    """Independent re-derivation from the raw answers (plain loops, no shared code with consensus.py)."""
    items = store.items_frame()
    answers = store.answers_frame(stage=2)
    chosen = set()
    for it in items.itertuples():
        if it.stage1_passed is not True:
            continue
        keys = [q.key for q in consensus_questions(it.kind, bool(it.has_text))]
        mine = answers[answers["item_id"] == it.item_id]
        finished = [a for a, g in mine.groupby("annotator") if set(keys) <= set(g["criterion"])]
        if len(finished) < min_experts:
            continue
        failed = 0
        for key in keys:
            votes = list(mine.loc[mine["criterion"] == key, "answer"])
            good = sum(v in question(key).good for v in votes)
            failed += good < min_good * len(votes) - 1e-9
        if failed <= max_failed:
            chosen.add(it.item_id)
    return chosen


def test_v1_within_v2_and_sizes_follow_thresholds(store: SftStore) -> None:
    table = consensus_table(store, ConsensusConfig())
    v1, v2 = set(table.loc[table["in_v1"], "item_id"]), set(table.loc[table["in_v2"], "item_id"])
    passed = {k for k, ok in store.stage1_outcomes().items() if ok}
    assert v1 <= v2 <= passed
    assert 0 < len(v1) < len(v2) < len(passed) < len(table)  # the seeded data exercises every boundary
    assert v1 == reference_membership(store, 3, 2 / 3, 0)
    assert v2 == reference_membership(store, 2, 0.5, 2)
    items, answers = store.items_frame(), store.answers_frame(stage=2)

    def members(version: str, **thresholds: float) -> set[str]:
        got = item_consensus(items, answers, ConsensusConfig(**thresholds))
        return set(got.loc[got[f"in_{version}"], "item_id"])

    # v2 with v1's thresholds is v1; looser / stricter thresholds grow / shrink it monotonically
    assert members("v2", v2_min_good=2 / 3, v2_min_experts=3, v2_max_failed_criteria=0) == v1
    v2_sets = [members("v2", v2_max_failed_criteria=k) for k in range(5)]
    assert all(a <= b for a, b in zip(v2_sets, v2_sets[1:])) and len(v2_sets[0]) < len(v2_sets[-1])
    v1_sets = [members("v1", v1_min_good=g, v2_min_good=0.3) for g in (1.0, 2 / 3, 1 / 3)]
    assert all(a <= b for a, b in zip(v1_sets, v1_sets[1:])) and len(v1_sets[0]) < len(v1_sets[-1])


def test_config_refuses_a_v2_stricter_than_v1() -> None:
    with pytest.raises(ValueError, match="v2 must relax v1"):
        ConsensusConfig(v2_min_good=0.8)
    with pytest.raises(ValueError, match="v2 must relax v1"):
        ConsensusConfig(v2_min_experts=4)
    ConsensusConfig(v2_min_good=2 / 3, v2_min_experts=3)  # equal is allowed


def test_stage1_failures_and_missing_experts_are_in_neither_version() -> None:
    items = pd.DataFrame([{"item_id": "a", "kind": "video", "has_text": False, "stage1_passed": False},
                          {"item_id": "b", "kind": "video", "has_text": False, "stage1_passed": True},
                          {"item_id": "c", "kind": "video", "has_text": False, "stage1_passed": True}])
    keys = [q.key for q in VIDEO_CRITERIA]
    rows = [(item, f"e{k}", key, question(key).options[0]) for item in ("a", "b", "c") for k in range(3)
            for key in keys]
    rows = [r for r in rows if not (r[0] == "c" and r[1] == "e2")]  # c: only 2 experts finished
    answers = pd.DataFrame(rows, columns=["item_id", "annotator", "criterion", "answer"])
    got = item_consensus(items, answers, ConsensusConfig()).set_index("item_id")
    assert list(got["in_v1"]) == [False, True, False]
    assert list(got["in_v2"]) == [False, True, True]  # v2 needs 2 experts
    assert json.loads(got.loc["b", "attributes"]) == {"vid_complexity": "complex", "vid_dynamics": "high"}


def test_krippendorff_alpha_matches_the_worked_example() -> None:
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal example: 4 observers, 12 units.
    units = [[1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4], [4, 4, 4, 4],
             [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha_nominal([[1, 1], [2, 2], [1, 1, 1]]) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal([[1, 2], [2, 1]]) < 0  # systematic disagreement
    assert krippendorff_alpha_nominal([[1, 1], [1, 1]]) is None  # no variation: undefined
    assert krippendorff_alpha_nominal([[1]]) is None


def test_agreement_reported_per_criterion(store: SftStore) -> None:
    agreement = agreement_by_criterion(store.answers_frame())
    assert {q.key for q in STAGE1 + IMAGE_CRITERIA + VIDEO_CRITERIA + TEXT_CRITERIA} == set(agreement)
    assert all(v["alpha"] is None or -1 <= v["alpha"] <= 1 for v in agreement.values())
    assert agreement["main_object"]["stage"] == 1 and agreement["img_wow_factor"]["stage"] == 2
    # the simulated raters share the item quality, so agreement is clearly positive on the graded criteria
    assert agreement["vid_aesthetics"]["alpha"] > 0.2


def test_mix_probabilities(store: SftStore, tmp_path: Path) -> None:
    table = consensus_table(store, ConsensusConfig())
    n_v1, n_only = int(table["in_v1"].sum()), int((table["in_v2"] & ~table["in_v1"]).sum())
    mix, info = mix_table(table, MixConfig(p_v1=0.7))
    assert len(mix) == n_v1 + n_only and mix["sample_prob"].sum() == pytest.approx(1.0)
    assert mix.loc[mix["in_v1"], "sample_prob"].sum() == pytest.approx(0.7)
    _, calibrated = mix_table(table, MixConfig(v1_upweight=3.0))
    assert calibrated["p_v1"] == pytest.approx(3 * n_v1 / (3 * n_v1 + n_only))
    _, only_v1 = mix_table(table.loc[table["in_v1"] | ~table["in_v2"]], MixConfig(p_v1=0.2))
    assert only_v1["p_v1"] == 1.0  # no v2-only rows to draw from
    path, _ = write_mix(table, MixConfig(p_v1=0.7), tmp_path)
    assert json.loads((tmp_path / "mix.json").read_text())["p_v1"] == 0.7 and pd.read_parquet(path).shape[0] == len(mix)
    with pytest.raises(ValueError, match="p_v1"):
        MixConfig(p_v1=1.5)


def test_versions_written_with_contract_columns(store: SftStore, tmp_path: Path) -> None:
    out = build_versions(store, ConsensusConfig(), tmp_path)
    v1, v2 = pd.read_parquet(out["v1"]["path"]), pd.read_parquet(out["v2"]["path"])
    assert set(v1["item_id"]) <= set(v2["item_id"]) and out["v1"]["rows"] == len(v1)
    assert {"item_id", "media_path", "caption", "domain", "criteria_good", "in_v1", "in_v2", "kind"} <= set(v1)
    assert v1["in_v1"].all() and v2["in_v2"].all()
    assert all(min(json.loads(c).values()) >= 2 / 3 - 1e-9 for c in v1["criteria_good"])


def test_simulation_is_seeded(tmp_path: Path) -> None:
    q = question("img_lighting_color")
    draws = [simulated_answer(SimulatedRaters(seed=s), "e", f"i{k}", 2, q) for s in (1, 1, 2) for k in range(30)]
    assert draws[:30] == draws[30:60] and draws[:30] != draws[60:]

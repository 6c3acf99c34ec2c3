"""SBS library pieces without models: the comparison registry and lineage names, the common generation size, stale
judgments archived on a new batch, the report from a real store (both directions), simulation labelling, export."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from evaluation.sbs.aggregate import ReportSettings, build_report, export_for_scoring, simulate_into_store
from evaluation.sbs.batch import BatchSettings, archive_stale_judgments, common_size
from evaluation.sbs.comparisons import (
    COMPARISONS,
    DEMO_COMPARISON,
    Comparison,
    LineageModel,
    resolve_model,
    stage_comparison,
    stages_referenced,
)
from evaluation.sbs.judgments_store import JudgmentsStore
from evaluation.sbs.sbs_plan import Assignment, Plan, PlanItem, criteria_for
from k5model.training.stages import CHAINS, TABLE4


def test_registry_names_table4_stages_only() -> None:
    assert DEMO_COMPARISON == "video_lite_mr_10s_vs_video_lite_t2i_lr"
    demo = COMPARISONS[DEMO_COMPARISON]
    assert (str(demo.model_a), str(demo.model_b)) == ("stage:video_lite_mr_10s", "stage:video_lite_t2i_lr")
    for key, c in COMPARISONS.items():
        # stages of Table 4, the SFT models recorded by sft_soup (report §6.4), a distilled model (report §6.5) or
        # the RL model (report §6.6)
        assert key == c.key and all((m.kind == "stage" and m.ref in TABLE4) or m.kind in ("sft", "distill", "rl")
                                    for m in c.models)
    assert set(stages_referenced()) <= set(TABLE4)
    assert stage_comparison("image_lite_hr", "image_lite_mr").prompt_set == "parti"
    assert demo.prompt_set == "moviegen"
    # every stage with a parent is compared with it
    assert {f"{s}_vs_{TABLE4[s].parent}" for chain in CHAINS.values() for s in chain if TABLE4[s].parent} \
        <= set(COMPARISONS)


def test_lineage_models_refuse_what_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="write 'stage:<stage>'"):
        LineageModel.parse("video_lite_lr")
    with pytest.raises(ValueError, match="unknown lineage model kind"):
        LineageModel.parse("s3:bucket/x")
    a = LineageModel.parse("stage:video_lite_lr")
    with pytest.raises(ValueError, match="two different models"):
        Comparison(model_a=a, model_b=LineageModel.parse("stage:video_lite_lr"), prompt_set="moviegen")
    with pytest.raises(FileNotFoundError, match="materialize train_video_lite_lr first"):
        resolve_model(a, lambda stage: tmp_path / stage)
    (tmp_path / "video_lite_lr").mkdir()
    (tmp_path / "video_lite_lr" / "model_index.json").write_text("{}")
    assert resolve_model(a, lambda stage: tmp_path / stage) == tmp_path / "video_lite_lr"


def test_common_size_suits_every_model() -> None:
    assert common_size(64, 64, [16, 128]) == (128, 128)  # a NABLA stage at demo scale against a dense one
    assert common_size(256, 384, [16, 128]) == (256, 384)  # already valid: unchanged
    assert common_size(200, 300, [16, 16]) == (208, 304)
    with pytest.raises(ValueError, match="overlap 3 needs at least 3 annotators"):
        BatchSettings(annotators=("a", "b"), overlap=3)


def _plan() -> Plan:
    items = [PlanItem("p1", "a cat", "p1_a.mp4", "p1_b.mp4"), PlanItem("p2", "a dog", "p2_a.mp4", "p2_b.mp4"),
             PlanItem("g0", "a cat", "p1_a.mp4", "p1_a.mp4", golden="identical")]
    sides = {"ann1": True, "ann2": False}
    assignments = [Assignment(a, i.item_id, left, n) for a, left in sides.items() for n, i in enumerate(items)]
    return Plan(items, assignments, overlap=2, seed=0,
                meta={"comparison": "x_vs_y", "model_a": "x", "model_b": "y", "model_a_ref": "stage:x",
                      "model_b_ref": "stage:y"})


def _batch(root: Path, plan: Plan) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(plan.to_json())
    return root


def _judge_all(root: Path, plan: Plan, prefer: str) -> None:
    """Every annotator prefers model ``prefer`` on every criterion, clicked on the side where it is shown."""
    with JudgmentsStore(root / "judgments.duckdb") as store:
        store.load_plan(plan)
        for a in plan.assignments:
            visual, pf = criteria_for("video")
            for c in visual + pf:
                left_is_preferred = a.a_on_left == (prefer == "A")
                store.record(a.annotator, a.item_id, c, "model1_better" if left_is_preferred else "model2_better")


@pytest.mark.parametrize("prefer", ["A", "B"])
def test_report_scores_the_store_in_the_direction_people_judged(tmp_path: Path, prefer: str) -> None:
    root = _batch(tmp_path / "batch", _plan())
    _judge_all(root, _plan(), prefer)
    result = build_report(root, ReportSettings(n_boot=50), log=lambda _: None)
    s = json.loads(result.summary_path.read_text())
    win, lose = ("model1", "model2") if prefer == "A" else ("model2", "model1")
    for group in ("overall_visual_quality", "overall_motion", "overall_prompt_following"):
        assert s[group][win] == 1.0 and s[group][lose] == 0.0
        assert s["ci95_diff"][group][0] == s["ci95_diff"][group][1] == (1.0 if prefer == "A" else -1.0)
    assert (s["model_a"], s["model_b"], s["simulated"], s["judgments_source"]) == ("stage:x", "stage:y", False, "store")
    assert s["n_items"] == 2 and not result.under_covered  # golden g0 left out of the scores


def test_simulation_only_when_configured_and_labelled(tmp_path: Path) -> None:
    plan = _plan()
    root = _batch(tmp_path / "batch", plan)
    with pytest.raises(ValueError, match="exclude each other"):
        ReportSettings(simulate=True, judgments_path="x.csv")
    result = build_report(root, ReportSettings(simulate=True, n_boot=20), log=lambda _: None)
    assert result.simulated and result.summary["judgments_source"] == "simulated"
    assert result.summary["n_simulated_judgments"] == result.summary["n_judgments"] > 0
    assert "SIMULATED" in result.html_path.read_text()
    # the same store, simulation not configured: the simulated rows stay out of the scores
    result = build_report(root, ReportSettings(n_boot=20), log=lambda _: None)
    assert not result.simulated and result.summary["n_judgments"] == 0 and result.under_covered
    # simulating again writes nothing twice
    with JudgmentsStore(root / "judgments.duckdb") as store:
        assert simulate_into_store(store, plan, p_a=0.6) == 0


def test_export_leaves_out_golden_and_simulated_and_refuses_a_foreign_store(tmp_path: Path) -> None:
    plan = _plan()
    root = _batch(tmp_path / "batch", plan)
    _judge_all(root, plan, "B")
    with JudgmentsStore(root / "judgments.duckdb") as store:
        simulate_into_store(store, plan, p_a=0.9)
    out = tmp_path / "out.csv"
    n = export_for_scoring(root / "judgments.duckdb", plan, out)
    df = pd.read_csv(out)
    assert n == len(df) == 2 * 2 * 17 and set(df["item_id"]) == {"p1", "p2"} and set(df["annotator"]) == {"ann1",
                                                                                                         "ann2"}
    assert export_for_scoring(root / "judgments.duckdb", plan, out, include_simulated=True) > n
    other = Plan([PlanItem("q1", "x", "a", "b")], [Assignment("ann1", "q1", True, 0)], overlap=1, seed=0)
    with pytest.raises(ValueError, match="none of the plan's pairs"):
        export_for_scoring(root / "judgments.duckdb", other, out)


def test_a_new_batch_archives_the_old_judgments_only_when_the_plan_changed(tmp_path: Path) -> None:
    plan = _plan()
    root = _batch(tmp_path / "batch", plan)
    _judge_all(root, plan, "A")
    assert archive_stale_judgments(root, plan.to_json()) is None  # same plan: same clips, judgments kept
    assert (root / "judgments.duckdb").exists()
    changed = Plan(plan.items, plan.assignments, plan.overlap, plan.seed, {**plan.meta, "media_sha256": {"p1": "0"}})
    archived = archive_stale_judgments(root, changed.to_json())
    assert archived is not None and (archived / "judgments.duckdb").exists() and (archived / "plan.json").exists()
    assert not (root / "judgments.duckdb").exists()
    with JudgmentsStore(archived / "judgments.duckdb") as store:
        assert store.count_judgments() == 2 * 3 * 17  # nothing lost


def test_comparisons_declared_in_a_file_extend_the_registry(tmp_path: Path) -> None:
    from evaluation.sbs.comparisons import load_comparisons, offered, registry

    released = tmp_path / "k5-image_lite-v2"
    released.mkdir()
    (released / "model_index.json").write_text(json.dumps({"_class_name": "Kandinsky5T2IPipeline"}))
    extra = tmp_path / "comparisons.json"
    extra.write_text(json.dumps([{"model_a": "stage:image_lite_hr", "model_b": f"folder:{released}"},
                                 {"model_a": "stage:video_lite_mr_10s", "model_b": f"folder:{tmp_path / 'gone'}"}]))
    pool = registry(extra)
    assert set(COMPARISONS) < set(pool)
    mine = pool["image_lite_hr_vs_k5_image_lite_v2"]
    assert mine.prompt_set == "parti" and str(mine.model_b) == f"folder:{released}"
    offered_keys = offered(pool.values())
    assert mine.key in offered_keys and "video_lite_mr_10s_vs_gone" not in offered_keys  # no folder: not offered
    assert registry(tmp_path / "absent.json") == COMPARISONS
    extra.write_text(json.dumps([{"model_a": "stage:image_lite_hr", "model_b": "folder:relative/path"}]))
    with pytest.raises(ValueError, match=r"comparisons.json: entry 0 .*absolute"):
        load_comparisons(extra)
    extra.write_text(json.dumps([{"model_a": "stage:video_lite_mr_10s", "model_b": "stage:video_lite_t2i_lr",
                                  "prompt_set": "parti"}]))
    with pytest.raises(ValueError, match="already defined differently"):
        registry(extra)

"""Acceptance (issue 14): judgments entered through the annotation app reach the ``sbs_report`` scores and the
release gate's input.

Real pieces only: the app (``python -m ui.annotation_app serve-demo``, what ``make ui`` starts) on 127.0.0.1, two
annotators logging in through Debian's Chromium driven by Playwright, the comparison's DuckDB judgments store, and
``sbs_report`` materialized in-process while the app keeps running. The same plan is judged twice, once with both
annotators preferring model B on every criterion and once preferring A: the scores, ``summary.json`` and the gate's
decision flip with the judgments.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from test_annotation_ui import CHROMIUM, browser, judge, login, start_app, stop_app  # noqa: F401  (browser: fixture)
from test_sbs_assets import DEMO_A, demo_stages, sbs_resources

from assets.sbs import sbs_batch, sbs_report
from evaluation.release_gate import OVERALL_GROUPS, decide
from evaluation.sbs.comparisons import DEMO_COMPARISON
from evaluation.sbs.sbs_plan import Plan, criteria_for
from evaluation.sbs.sbs_scores import CRITERION_LABELS

pytestmark = pytest.mark.slow  # two app servers, a browser and ~70 key presses: about a minute on a busy box

ANNOTATORS = ("ann1", "ann2")


def annotate(browser, url: str, user: str, prefer: str, a_on_left: bool) -> None:  # noqa: F811  (browser: fixture)
    """Log in as ``user`` (serve-demo password) and judge the one assigned pair on every criterion, always preferring
    the side that shows model ``prefer`` ("a" or "b"). The page does not tell the sides apart (opaque media URLs), so
    the side comes from the plan (``a_on_left`` of this annotator's assignment)."""
    page = login(browser, url, user, "demo")
    assert "_a." not in page.content() and "_b." not in page.content()
    visual, pf = criteria_for("video")
    for criterion in visual + pf:
        key = "1" if (prefer == "a") == a_on_left else "2"  # button 1 = left model better, 2 = right model better
        judge(page, key, criterion, "model1_better" if key == "1" else "model2_better")
    page.wait_for_function("document.querySelector('#k5-header').innerText.includes('1/1 pairs done')")
    page.context.close()


def test_judgments_entered_in_the_app_decide_the_report_and_the_gate(tmp_path: Path, browser) -> None:  # noqa: F811
    assert Path(CHROMIUM).exists(), "Debian's chromium package is required (apt-get install -y chromium)"
    homes = {"b": tmp_path / "k5_prefer_b", "a": tmp_path / "k5_prefer_a"}
    batch_cfg = {"subset_size": 1, "annotators": list(ANNOTATORS), "overlap": 2, "golden_identical": 0,
                 "golden_degraded": 0, "num_steps": 2, "num_frames": 5, "seed": 1}
    with dg.instance_for_test() as instance:
        demo_stages(instance, homes["b"])
        res = dg.materialize([sbs_batch], partition_key=DEMO_COMPARISON, instance=instance,
                             resources=sbs_resources(tmp_path, homes["b"]),
                             run_config={"ops": {"sbs_batch": {"config": batch_cfg}}})
        assert res.success
        # the same plan and media, judged the opposite way in a second K5_HOME
        roots = {k: h / "sbs" / DEMO_COMPARISON for k, h in homes.items()}
        roots["a"].mkdir(parents=True)
        shutil.copy(roots["b"] / "plan.json", roots["a"] / "plan.json")
        shutil.copytree(roots["b"] / "media", roots["a"] / "media")
        plan = Plan.from_json((roots["b"] / "plan.json").read_text())
        assert {a.annotator for a in plan.assignments} == set(ANNOTATORS) and len(plan.items) == 1
        # both annotators share the pair; with seed 1 one of them sees A on the left, the other on the right
        assert {a.a_on_left for a in plan.assignments} == {True, False}
        apps = {k: start_app(["serve-demo", str(root)]) for k, root in roots.items()}
        try:
            summaries, metas = {}, {}
            for prefer, (_, url) in apps.items():
                for user in ANNOTATORS:
                    [mine] = plan.for_annotator(user)
                    annotate(browser, url, user, prefer, mine.a_on_left)
                # the app is still running: the report takes its turn on the judgments file
                res = dg.materialize([sbs_report], partition_key=DEMO_COMPARISON, instance=instance,
                                     resources=sbs_resources(tmp_path, homes[prefer]),
                                     run_config={"ops": {"sbs_report": {"config": {"n_boot": 200}}}})
                assert res.success
                [check] = res.get_asset_check_evaluations()
                assert check.check_name == "judged_overlap" and check.passed  # both annotators judged the pair
                metas[prefer] = {k: v.value for m in res.asset_materializations_for_node("sbs_report")
                                 for k, v in m.metadata.items()}
                summaries[prefer] = json.loads(Path(metas[prefer]["summary_path"]).read_text())
        finally:
            for proc, _ in apps.values():
                stop_app(proc)

    visual, pf = criteria_for("video")
    for prefer, summary in summaries.items():
        assert summary["simulated"] is False and summary["judgments_source"] == "store"
        assert summary["annotators"] == list(ANNOTATORS)
        assert summary["n_judgments"] == len(ANNOTATORS) * len(visual + pf)
        winner, loser = ("model2", "model1") if prefer == "b" else ("model1", "model2")
        for group in OVERALL_GROUPS:
            assert summary[group][winner] > summary[group][loser], (prefer, group, summary[group])
            assert metas[prefer]["overall"][group][winner] == summary[group][winner]
        page = Path(metas[prefer]["summary_path"]).with_name("sbs_report.html").read_text()
        assert CRITERION_LABELS["visual_1"] in page and "SIMULATED" not in page
    # the release gate's input: the candidate (model A, the last stage) is kept when people prefer B, promoted
    # when they prefer A
    verdicts = {k: decide(s, candidate=f"stage:{DEMO_A}", champion=None, margin=0.0) for k, s in summaries.items()}
    assert not verdicts["b"].promote and verdicts["a"].promote, {k: v.lines() for k, v in verdicts.items()}

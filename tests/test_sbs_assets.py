"""The SBS assets end to end on tiny demo models: batch -> simulated judgments -> report, MLflow, overlap checks."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from assets.sbs import sbs_batch, sbs_report
from evaluation.sbs.sbs_plan import Plan, coverage
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource

pytestmark = pytest.mark.slow  # real server / browser / generation: tens of seconds

PARTITION = "demo_tiny_seed0_vs_seed1"


def test_demo_batch_and_report(tmp_path: Path) -> None:
    home = tmp_path / "k5"
    resources = {"k5_home": K5HomeResource(home=str(home)),
                 "mlflow": MLflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                          artifact_location=str(tmp_path / "mlartifacts")),
                 "object_store": ObjectStoreResource(base_uri=str(tmp_path / "objects"))}
    annotators = [f"ann{k}" for k in range(5)]
    batch_cfg = {"subset_size": 2, "annotators": annotators, "overlap": 5, "num_steps": 2}
    res = dg.materialize([sbs_batch], partition_key=PARTITION, resources=resources,
                         run_config={"ops": {"sbs_batch": {"config": batch_cfg}}})
    assert res.success
    root = home / "sbs" / PARTITION
    plan = Plan.from_json((root / "plan.json").read_text())
    assert len(plan.items) == 4 and set(plan.golden_map()) == {f"{PARTITION}-golden0", f"{PARTITION}-golden1"}
    assert all(n == 5 for n in coverage(plan).values())
    for item in plan.items:  # both models' media exist, same seed per prompt
        assert (root / "media" / item.media_a).is_file() and (root / "media" / item.media_b).is_file()
    assert (tmp_path / "objects" / "sbs" / PARTITION / "plan.json").is_file()
    [check] = res.get_asset_check_evaluations()
    assert check.check_name == "plan_overlap" and check.passed

    res = dg.materialize([sbs_report], partition_key=PARTITION, resources=resources,
                         run_config={"ops": {"sbs_report": {"config": {"n_boot": 100}}}})
    assert res.success
    [check] = res.get_asset_check_evaluations()
    assert check.check_name == "judged_overlap" and check.passed
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert summary["overall_visual_quality"]["model1"] > 0 and summary["n_items"] == 2
    assert (root / "report" / "sbs_bars.png").read_bytes()[:4] == b"\x89PNG"
    assert "Krippendorff" in (root / "report" / "sbs_report.html").read_text()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("k5-lifecycle")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"sbs_report/" + PARTITION, "model/tiny_t2v_seed0", "model/tiny_t2v_seed1"} <= set(runs)
    a_metrics = runs["model/tiny_t2v_seed0"].data.metrics
    assert a_metrics[f"sbs.{PARTITION}.overall_visual_quality"] == summary["overall_visual_quality"]["model1"]
    assert runs["model/tiny_t2v_seed1"].data.metrics[f"sbs.{PARTITION}.overall_visual_quality"] == \
        summary["overall_visual_quality"]["model2"]

    # An exported judgments table with only 2 annotators per pair: the overlap check must fail.
    rows = [(i.item_id, a, "visual_1", "model1_better") for i in plan.items for a in annotators[:2]]
    rows.append((plan.items[0].item_id, "ann0", "visual_99", "equally"))  # invalid, line 18
    path = tmp_path / "export.csv"
    pd.DataFrame(rows, columns=["item_id", "annotator", "criterion", "choice"]).to_csv(path, index=False)
    res = dg.materialize([sbs_report], partition_key=PARTITION, resources=resources,
                         run_config={"ops": {"sbs_report": {"config": {"judgments_path": str(path), "n_boot": 50}}}})
    assert res.success
    [check] = res.get_asset_check_evaluations()
    assert not check.passed and check.metadata["under_covered_pairs"].value == 2
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert summary["invalid_rows"] == [len(rows) + 1]

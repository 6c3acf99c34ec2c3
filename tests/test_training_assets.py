"""The Video Lite demo chain as Dagster assets: Pipes subprocess jobs, MLflow runs per stage, checks."""

from __future__ import annotations

import dagster as dg
from mlflow.tracking import MlflowClient

from assets.training import stage_assets, stage_checks, stage_dir
from k5model.training.stages import CHAINS
from orchestration.resources import K5HomeResource, MLflowResource


def test_video_lite_chain_materializes_with_lineage(tmp_path, monkeypatch):
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    chain = CHAINS["video_lite"]
    keys = {f"train_{s}" for s in chain}
    selected = [a for a in stage_assets if a.key.to_user_string() in keys]
    checks = [c for c in stage_checks if next(iter(c.check_keys)).asset_key.to_user_string() in keys]
    resources = {"k5_home": K5HomeResource(), "mlflow": MLflowResource(),
                 "pipes_client": dg.PipesSubprocessClient()}
    result = dg.materialize([*selected, *checks], resources=resources, instance=dg.DagsterInstance.ephemeral(),
                            raise_on_error=False)
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 2 * len(chain) and all(e.passed for e in evaluations)
    # each stage started from its parent's exported EMA weights, and every stage's metadata carries the MLflow link
    for stage in chain:
        meta = result.asset_materializations_for_node(f"train_{stage}")[0].metadata
        assert meta["steps"].value == 3 and meta["final_loss"].value == meta["final_loss"].value  # not NaN
        assert "mlflow_run" in meta and (stage_dir(K5HomeResource(), stage) / "ema" / "transformer").is_dir()
    # MLflow: one run per stage nested under one lineage run, with per-step metrics and the checkpoint artifact
    mlflow = MLflowResource()
    client = MlflowClient(mlflow.resolved_tracking_uri())
    runs = client.search_runs([mlflow.experiment_id()])
    lineage = [r for r in runs if r.data.tags.get("k5_lineage") == "video_lite"]
    stages = [r for r in runs if "k5_stage" in r.data.tags]
    assert len(lineage) == 1 and {r.data.tags["k5_stage"] for r in stages} == set(chain)
    assert all(r.data.tags["mlflow.parentRunId"] == lineage[0].info.run_id for r in stages)
    first = next(r for r in stages if r.data.tags["k5_stage"] == chain[1])
    assert first.data.params["init"].endswith("video_lite_t2i_lr/ema/transformer")
    assert len(client.get_metric_history(first.info.run_id, "loss")) == 3
    assert any(f.path == "transformer" for f in client.list_artifacts(first.info.run_id))

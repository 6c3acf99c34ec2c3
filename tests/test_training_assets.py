"""The Video Lite demo chain as Dagster assets: Pipes subprocess jobs, MLflow runs per stage, checks."""

from __future__ import annotations

import dagster as dg
import torch
from mlflow.tracking import MlflowClient

from assets.training import stage_assets, stage_checks, stage_dir
from k5model.training.stages import CHAINS
from orchestration.resources import K5HomeResource, MLflowResource
from orchestration.training_jobs import TrainingJobResource


def test_video_lite_chain_materializes_with_lineage(tmp_path, monkeypatch, tiny_t2v_dir):
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    chain = CHAINS["video_lite"]
    keys = {f"train_{s}" for s in chain}
    selected = [a for a in stage_assets if a.key.to_user_string() in keys]
    checks = [c for c in stage_checks if next(iter(c.check_keys)).asset_key.to_user_string() in keys]
    resources = {"k5_home": K5HomeResource(), "mlflow": MLflowResource(), "training_job": TrainingJobResource()}
    # samples at the last step of every stage, with the session's tiny pipeline (not rebuilt under this K5_HOME)
    run_config = {"ops": {key: {"config": {"sample_pipeline": str(tiny_t2v_dir)}} for key in keys}}
    result = dg.materialize([*selected, *checks], resources=resources, instance=dg.DagsterInstance.ephemeral(),
                            raise_on_error=False, run_config=run_config)
    assert result.success
    assert all(result.asset_materializations_for_node(k)[0].metadata["samples_logged"].value == 1 for k in keys)
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


def test_k5_train_cli_progress_and_exports(tmp_path):
    from click.testing import CliRunner

    from k5cli.main import main
    from k5model.crossdit import CrossDiT

    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "video_lite_mr_10s", "--demo", "--out", str(out), "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert "trained to step 2" in res.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    folder = CrossDiT.from_pretrained(out / "ema" / "transformer")
    single = CrossDiT.from_pretrained(out / "ema" / "video_lite_mr_10s.safetensors", config=folder.config)
    assert folder.config.attention_type == "nabla"
    # the single file holds the same weights, rounded to bf16 except the fp32 time/modulation tensors
    for (key, a), (key2, b) in zip(folder.state_dict().items(), single.state_dict().items()):
        assert key == key2
        assert torch.equal(a.to(b.dtype), b), key
    assert single.visual_transformer_blocks[0].visual_modulation.out_layer.weight.dtype == torch.float32
    assert single.visual_transformer_blocks[0].feed_forward.in_layer.weight.dtype == torch.bfloat16

"""A training stage's MLflow run is live (issue 5): the asset creates the run, the Pipes job logs per-step metrics,
system metrics, sample generations and the exported checkpoint into it (real Dagster in-process, MLflow on SQLite)."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg
import pytest
import torch
from lineage_fixtures import record_training_upstream
from mlflow.tracking import MlflowClient

from assets.training import stage_assets
from k5model.config import get_preset
from k5model.training.batch import PackedBatch
from k5model.training.throughput import batch_tokens_and_flops, forward_flops
from orchestration.lineage import stage_dir
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource, TrainingJobResource
from orchestration.settings import K5Paths

STAGE = "video_lite_lr"  # a video stage: mp4 samples, I2V/T2V mix, FSDP path in one process
STEP_METRICS = ("loss", "grad_norm", "lr", "tokens_per_s", "model_tflops", "step_time_s", "peak_mem_gib")


def _materialize(config: dict, t2v: Path, t2i: Path) -> dg.ExecuteInProcessResult:
    asset = next(a for a in stage_assets if a.key.to_user_string() == f"train_{STAGE}")
    resources = {"k5_home": K5HomeResource(), "mlflow": MLflowResource(), "object_store": ObjectStoreResource(),
                 "training_job": TrainingJobResource()}
    instance = dg.DagsterInstance.ephemeral()
    record_training_upstream(instance, K5Paths.from_env().ensure().object_store, t2v, t2i)
    return dg.materialize([asset], resources=resources, instance=instance, raise_on_error=False,
                          run_config={"ops": {f"train_{STAGE}": {"config": config}}})


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_stage_logs_live_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_t2v_dir: Path,
                                   tiny_t2i_dir: Path) -> None:
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    # start from released weights (the tiny pipeline's transformer folder); samples use the base pipeline's encoders
    result = _materialize({"steps": 3, "init_from": str(tiny_t2v_dir / "transformer"), "sample_every": 2},
                          tiny_t2v_dir, tiny_t2i_dir)
    assert result.success
    meta = {k: v.value for k, v in result.asset_materializations_for_node(f"train_{STAGE}")[0].metadata.items()}
    mlflow = MLflowResource()
    client = MlflowClient(mlflow.resolved_tracking_uri())
    run = client.get_run(meta["mlflow_run_id"])
    assert meta["mlflow_run"].endswith(f"/runs/{run.info.run_id}") and run.info.status == "FINISHED"
    lineage = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert lineage.data.tags["k5_lineage"] == "video_lite" and run.data.tags["k5_stage"] == STAGE
    assert run.data.params["stage.lr"] == "6e-05" and run.data.params["init"].endswith("transformer")

    # per-step metrics, logged live by the job
    for key in STEP_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3], key
        assert all(math.isfinite(m.value) and (m.value > 0 or key == "loss") for m in history), key
    losses = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert meta["final_loss"] == losses[-1].value
    assert meta["tokens_per_s"] > 0 and run.data.tags["k5_checkpoint_uri"].startswith("file://")
    assert (stage_dir(K5Paths.from_env(), STAGE) / "ema" / "transformer" / "config.json").is_file()
    # system metrics (MLflow's monitor, psutil on CPU)
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system

    # samples at step 2 (every 2) and at the last step, the exported checkpoint as artifacts
    files = _artifacts(client, run.info.run_id)
    for step in (2, 3):
        assert {f"samples/step_{step}/00.mp4", f"samples/step_{step}/01.mp4",
                f"samples/step_{step}/prompts.json"} <= files, sorted(files)
    assert {"transformer/config.json", f"checkpoint/{STAGE}.safetensors"} <= files
    assert meta["samples_logged"] == 2
    local = Path(client.download_artifacts(run.info.run_id, "samples/step_3/00.mp4", str(tmp_path / "dl")))
    from k5model.media import read_video

    frames = read_video(local)
    # 2 latent frames -> 5 at the stage's most likely Table 4 resolution, 384x256 px -> 6x4 demo latents -> 48x32 px
    assert frames.shape[:3] == (5, 48, 32)


def test_failed_stage_marks_run_failed_and_keeps_last_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tiny_t2v_dir: Path, tiny_t2i_dir: Path) -> None:
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    good = stage_dir(K5Paths.from_env(), STAGE)
    good.mkdir(parents=True)
    (good / "marker").write_text("last good stage")
    bad_init = tmp_path / "not_a_checkpoint"
    bad_init.mkdir()
    result = _materialize({"steps": 2, "init_from": str(bad_init), "sample_every": None}, tiny_t2v_dir, tiny_t2i_dir)
    assert not result.success
    assert (good / "marker").read_text() == "last good stage"  # the failed run replaced nothing
    mlflow = MLflowResource()
    client = MlflowClient(mlflow.resolved_tracking_uri())
    runs = [r for r in client.search_runs([mlflow.experiment_id()]) if r.data.tags.get("k5_stage") == STAGE]
    # one run per attempt (the RetryPolicy tries twice), each FAILED, and the lineage run with them
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    assert client.get_run(runs[0].data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_flop_count_by_hand() -> None:
    cfg = get_preset("tiny")  # d 32, ff 64, 2 visual blocks, patch (1, 2, 2)
    n, t = 8, 3
    per_block = 2 * n * (4 * 32 * 32 + 2 * 32 * 64) + 2 * n * 2 * 32 * 32 + 2 * t * 2 * 32 * 32 \
        + 4 * n * n * 32 + 4 * n * t * 32
    assert forward_flops(cfg, n, t) == 2 * per_block
    # a packed batch: per-sample latents, real text tokens only
    packed = PackedBatch([torch.zeros(2, 4, 4, 16), torch.zeros(1, 6, 4, 16)], [torch.zeros(4, 32), torch.zeros(2, 32)],
                         torch.zeros(2, 32), ["t2v", "t2v"])
    assert batch_tokens_and_flops(cfg, packed) == (8 + 6, 3 * (forward_flops(cfg, 8, 4) + forward_flops(cfg, 6, 2)))

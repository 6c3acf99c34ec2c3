"""A training stage's MLflow run is live (issue 5): the asset creates the run, the Pipes job logs per-step metrics,
system metrics, sample generations and the exported checkpoint into it (real Dagster in-process, MLflow on SQLite)."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg
import pytest
import torch
from mlflow.tracking import MlflowClient

from assets.training import stage_assets, stage_dir
from k5model.config import get_preset
from k5model.training.throughput import batch_tokens_and_flops, forward_flops
from orchestration.resources import K5HomeResource, MLflowResource
from orchestration.training_jobs import TrainingJobResource

STAGE = "video_lite_lr"  # a video stage: mp4 samples, I2V/T2V mix, FSDP path in one process
STEP_METRICS = ("loss", "grad_norm", "lr", "tokens_per_s", "model_tflops", "step_time_s", "peak_mem_gib")


def _materialize(config: dict) -> dg.ExecuteInProcessResult:
    asset = next(a for a in stage_assets if a.key.to_user_string() == f"train_{STAGE}")
    resources = {"k5_home": K5HomeResource(), "mlflow": MLflowResource(), "training_job": TrainingJobResource()}
    return dg.materialize([asset], resources=resources, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
                          run_config={"ops": {f"train_{STAGE}": {"config": config}}})


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_stage_logs_live_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_t2v_dir: Path) -> None:
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    # start from released weights (the tiny pipeline's transformer folder) and sample with its encoders and VAE
    result = _materialize({"steps": 3, "init_from": str(tiny_t2v_dir / "transformer"), "sample_every": 2,
                           "sample_pipeline": str(tiny_t2v_dir)})
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
    assert meta["tokens_per_s"] > 0 and meta["checkpoint_uri"].startswith("file://")
    assert (stage_dir(K5HomeResource(), STAGE) / "ema" / "transformer" / "config.json").is_file()
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
    # 2 latent frames -> 5; the most likely resolution, 384x256 px in Table 4 -> 6x4 demo latents -> 48x32 px
    assert frames.shape[:3] == (5, 48, 32)


def test_failed_stage_marks_run_failed_and_keeps_last_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    good = stage_dir(K5HomeResource(), STAGE)
    good.mkdir(parents=True)
    (good / "marker").write_text("last good stage")
    bad_init = tmp_path / "not_a_checkpoint"
    bad_init.mkdir()
    result = _materialize({"steps": 2, "init_from": str(bad_init), "sample_every": None})
    assert not result.success
    assert (good / "marker").read_text() == "last good stage"  # the failed run replaced nothing
    mlflow = MLflowResource()
    client = MlflowClient(mlflow.resolved_tracking_uri())
    runs = [r for r in client.search_runs([mlflow.experiment_id()]) if r.data.tags.get("k5_stage") == STAGE]
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


def test_flop_count_by_hand() -> None:
    cfg = get_preset("tiny")  # d 32, ff 64, 2 visual blocks, patch (1, 2, 2)
    n, t = 8, 3
    per_block = 2 * n * (4 * 32 * 32 + 2 * 32 * 64) + 2 * n * 2 * 32 * 32 + 2 * t * 2 * 32 * 32 \
        + 4 * n * n * 32 + 4 * n * t * 32
    assert forward_flops(cfg, n, t) == 2 * per_block
    # a batch of two (2 frames, 4 x 4) latents = 2 x 2 x 2 = 8 tokens each, with 3 and 1 real text tokens
    batch = {"x0": torch.zeros(2, 2, 4, 4, 16), "text_mask": torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)}
    tokens, flops = batch_tokens_and_flops(cfg, batch)
    assert tokens == 16 and flops == 3 * (forward_flops(cfg, 8, 3) + forward_flops(cfg, 8, 1))
    # packed batches: a list of per-sample latents
    packed = {"packed": True, "x0": [torch.zeros(2, 4, 4, 16), torch.zeros(1, 6, 4, 16)],
              "text_embeds": [torch.zeros(4, 32), torch.zeros(2, 32)]}
    assert batch_tokens_and_flops(cfg, packed) == (8 + 6, 3 * (forward_flops(cfg, 8, 4) + forward_flops(cfg, 6, 2)))

"""The Video Lite chain as Dagster assets on latent shards: Pipes subprocess jobs from one TrainJob, complete pipeline
exports, MLflow runs per stage with their lineage, retries that resume after a SIGKILL, and the generated CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
from lineage_fixtures import record_training_upstream
from mlflow.tracking import MlflowClient

from assets.training import stage_assets, stage_checks
from k5model.training.stages import CHAINS
from orchestration.lineage import stage_dir
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource, TrainingJobResource
from orchestration.settings import K5Paths

RESOURCES = {"k5_home": K5HomeResource(), "mlflow": MLflowResource(), "object_store": ObjectStoreResource(),
             "training_job": TrainingJobResource()}


def _instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, t2v: Path, t2i: Path) -> dg.DagsterInstance:
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    instance = dg.DagsterInstance.ephemeral()
    record_training_upstream(instance, K5Paths.from_env().ensure().object_store, t2v, t2i)
    return instance


def _assets(stages: list[str], checks: bool = False) -> list:
    keys = {f"train_{s}" for s in stages}
    out = [a for a in stage_assets if a.key.to_user_string() in keys]
    return out + ([c for c in stage_checks if next(iter(c.check_keys)).asset_key.to_user_string() in keys]
                  if checks else [])


def test_video_lite_chain_trains_on_shards_and_exports_pipelines(tmp_path, monkeypatch, tiny_t2v_dir, tiny_t2i_dir):
    instance = _instance(tmp_path, monkeypatch, tiny_t2v_dir, tiny_t2i_dir)
    chain = CHAINS["video_lite"]
    result = dg.materialize(_assets(chain, checks=True), resources=RESOURCES, instance=instance, raise_on_error=False)
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 2 * len(chain) and all(e.passed for e in evaluations)
    client = MlflowClient(MLflowResource().resolved_tracking_uri())
    for stage in chain:
        meta = {k: v.value for k, v in result.asset_materializations_for_node(f"train_{stage}")[0].metadata.items()}
        assert meta["steps"] == 3 and meta["samples_consumed"] > 0 and meta["tokens_consumed"] > 0
        assert meta["shard_index_uri"].endswith("latents/index.parquet")
        assert meta["dataset_snapshot"] == "test-shards@seed0"
        # the T2I stage reads image shards, the video stages video shards of their own classes
        assert meta["shard_classes"] == ("low" if stage.endswith("lr") else "medium")
        pipeline = Path(meta["pipeline_dir"])
        assert pipeline == stage_dir(K5Paths.from_env(), stage) / "pipeline"
        assert (pipeline / "transformer").is_dir() and not (pipeline / "transformer").is_symlink()
        assert (pipeline / "vae").is_symlink() and (pipeline / "vae" / "config.json").is_file()
        run = client.get_run(meta["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["dagster_asset"] == f"train_{stage}"
        assert run.data.tags["dagster_run_url"].endswith(f"/runs/{result.run_id}")
        assert run.data.tags["k5_checkpoint_uri"].endswith(f"training/{stage}/ema/transformer")  # never .partial
        assert run.data.tags["k5_shard_index_uri"] == meta["shard_index_uri"]
        assert int(run.data.tags["k5_samples_consumed"]) == meta["samples_consumed"]
    lineage = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert lineage.info.status == "FINISHED" and lineage.data.tags["k5_lineage"] == "video_lite"
    # each stage started from its parent's exported EMA weights
    second = client.get_run(result.asset_materializations_for_node(f"train_{chain[1]}")[0]
                            .metadata["mlflow_run_id"].value)
    assert second.data.params["init"].endswith(f"{chain[0]}/ema/transformer")
    # the NABLA stage trains dense at demo scale, and says why
    last = client.get_run(result.asset_materializations_for_node(f"train_{chain[-1]}")[0]
                          .metadata["mlflow_run_id"].value)
    assert "NABLA" in last.data.tags["k5_shard_classes_reason"] and last.data.params["job.attention"] == "regular"
    # the exported pipeline generates with our pipeline
    from k5model.pipeline import K5Pipeline

    pipe = K5Pipeline.from_pretrained(stage_dir(K5Paths.from_env(), chain[-1]) / "pipeline")
    out = pipe.generate("a fox", height=32, width=32, num_frames=5, num_steps=2, seed=0, progress=False)
    assert torch.isfinite(torch.as_tensor(out.frames, dtype=torch.float32)).all()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out + [g for c in out for g in _children(c)]


def _kill_job_after(steps: list[int], metrics: Path, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the Pipes training subprocess each time metrics.jsonl reaches the next step of ``steps``."""
    todo = list(steps)
    while todo and not stop.is_set():
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and json.loads(lines[-1])["step"] >= todo[0]:
            jobs = [p for p in _children(os.getpid())
                    if b"orchestration.pipes_train" in Path(f"/proc/{p}/cmdline").read_bytes()]
            for p in jobs:
                os.kill(p, signal.SIGKILL)
            if jobs:
                killed.append(todo.pop(0))
        time.sleep(0.05)


def _losses(stage: str) -> dict[int, float]:
    lines = (stage_dir(K5Paths.from_env(), stage) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_killed_stage_resumes_exactly_on_retry_and_rematerialization(tmp_path, monkeypatch, tiny_t2v_dir,
                                                                      tiny_t2i_dir):
    stage, config = "video_lite_t2i_lr", {"steps": 6, "ckpt_every": 1, "sample_every": None}
    run_config = {"ops": {f"train_{stage}": {"config": config}}}
    reference_instance = _instance(tmp_path / "ref", monkeypatch, tiny_t2v_dir, tiny_t2i_dir)
    assert dg.materialize(_assets([stage]), resources=RESOURCES, instance=reference_instance,
                          run_config=run_config).success
    reference = _losses(stage)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    instance = _instance(tmp_path / "killed", monkeypatch, tiny_t2v_dir, tiny_t2i_dir)
    monkeypatch.setenv("K5_TRAIN_STEP_SLEEP_S", "0.6")
    work = stage_dir(K5Paths.from_env(), stage).with_name(f".{stage}.partial")
    stop, killed = threading.Event(), []
    # kill at step 2 (the RetryPolicy's second attempt resumes), then at step 4 (no retries left: the run fails)
    watcher = threading.Thread(target=_kill_job_after, args=([2, 4], work / "metrics.jsonl", stop, killed))
    watcher.start()
    try:
        first = dg.materialize(_assets([stage]), resources=RESOURCES, instance=instance, run_config=run_config,
                               raise_on_error=False)
    finally:
        stop.set()
        watcher.join()
    assert killed == [2, 4] and not first.success
    assert not stage_dir(K5Paths.from_env(), stage).exists()  # nothing published by a killed job
    assert (work / "checkpoints").is_dir()
    # a manual re-materialization resumes from the newest complete checkpoint of the killed attempts
    monkeypatch.delenv("K5_TRAIN_STEP_SLEEP_S")
    second = dg.materialize(_assets([stage]), resources=RESOURCES, instance=instance, run_config=run_config)
    meta = second.asset_materializations_for_node(f"train_{stage}")[0].metadata
    assert meta["resumed_attempt"].value is True and meta["resumed_from"].value >= 3
    assert meta["skipped_checkpoints"].value == ""  # a kill mid-save leaves step_N.tmp, never a damaged step_N
    assert _losses(stage) == reference  # step for step, bit for bit
    assert not work.exists()


def test_changed_job_starts_afresh_instead_of_resuming(tmp_path: Path) -> None:
    from k5model.training.job import TrainJob
    from orchestration.stage_runs import prepare_work

    class Log:
        lines: list[str] = []

        def info(self, msg: str) -> None:
            self.lines.append(msg)

    work = tmp_path / ".stage.partial"
    job = TrainJob.from_flat(stage="video_lite_lr", demo=True, out=str(work), steps=3)
    assert prepare_work(work, job, Log()) is False
    (work / "checkpoints").mkdir()
    assert prepare_work(work, job.replace(steps=6, resume=True), Log()) is True  # more steps: same run continues
    assert (work / "checkpoints").is_dir()
    assert prepare_work(work, job.replace(seed=7), Log()) is False  # another seed: old checkpoints are not ours
    assert not (work / "checkpoints").exists() and "seed" in Log.lines[-1]


def test_stage_lr_config_overrides_the_table_rate_only_when_set(tmp_path: Path) -> None:
    from orchestration.stage_runs import StageInputs, build_job

    def job_lr(lr: float | None) -> float | None:
        inputs = StageInputs(stage="video_lite_mr_10s", chain="video_lite", steps=3, lr=lr, demo=True, ckpt_every=1,
                             init=None, base_pipeline="base", shard_meta={"prefix": "latents", "classes": []},
                             store_uri="file:///x")
        return build_job(inputs, tmp_path / "work")[0].flat()["lr"]

    assert job_lr(None) is None  # the trainer takes the Table 4 stage's rate
    assert job_lr(1e-3) == 1e-3


def test_loss_check_decides_both_ways() -> None:
    from orchestration.stage_runs import TREND_MIN_STEPS, loss_problems

    assert loss_problems([2.0, 2.1, 1.9]) == []  # too short for a trend: finiteness only
    assert loss_problems([2.0, float("nan"), 1.9]) == ["non-finite loss at steps [2]"]
    assert loss_problems([]) == ["no step was logged"]
    falling = [3.0 - 0.1 * i for i in range(TREND_MIN_STEPS)]
    assert loss_problems(falling) == []
    assert "loss rose" in loss_problems(falling[::-1])[0]


def test_k5_train_help_lists_every_trainjob_field() -> None:
    from click.testing import CliRunner

    from k5cli.main import main
    from k5model.training.job import job_fields

    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    for _section, field, doc in job_fields():
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(doc.split()[:4]) in " ".join(text.split()), field.name  # the field docstring is the help
    for flag in ("--resume", "--init", "--shards", "--base-pipeline", "--nproc"):
        assert flag in text
    from k5cli.train import train

    assert {p.name for p in train.params} == {f.name for _, f, _ in job_fields()}
    assert dataclasses.is_dataclass(job_fields()[0][1]) is False  # fields, not classes


def test_k5_train_cli_progress_and_exports(tmp_path, tiny_t2v_dir):
    from click.testing import CliRunner

    from k5cli.main import main
    from k5model.crossdit import CrossDiT

    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--stage", "video_lite_mr_10s", "--demo", "--out", str(out), "--steps",
                                    "2", "--base-pipeline", str(tiny_t2v_dir)])
    assert res.exit_code == 0, res.output
    assert "trained to step 2" in res.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    folder = CrossDiT.from_pretrained(out / "ema" / "transformer")
    single = CrossDiT.from_pretrained(out / "ema" / "video_lite_mr_10s.safetensors", config=folder.config)
    assert folder.config.attention_type == "nabla"
    assert CrossDiT.from_pretrained(out / "pipeline").state_dict().keys() == folder.state_dict().keys()
    assert json.loads((out / "pipeline" / "model_index.json").read_text())["_class_name"] == "Kandinsky5T2VPipeline"
    from diffusers import Kandinsky5T2VPipeline

    loaded = Kandinsky5T2VPipeline.from_pretrained(out / "pipeline")  # the linked folder is a diffusers pipeline
    assert torch.equal(loaded.transformer.state_dict()["out_layer.out_layer.weight"],
                       folder.state_dict()["out_layer.out_layer.weight"])
    # the single file holds the same weights, rounded to bf16 except the fp32 time/modulation tensors
    for (key, a), (key2, b) in zip(folder.state_dict().items(), single.state_dict().items()):
        assert key == key2
        assert torch.equal(a.to(b.dtype), b), key
    bad = CliRunner().invoke(main, ["train", "--stage", "tiny_demo", "--out", str(out), "--shards", "x"])
    assert bad.exit_code == 2 and "shards needs store" in bad.output

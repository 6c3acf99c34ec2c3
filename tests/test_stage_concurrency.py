"""One materialization of a training stage at a time (issue 20): a second concurrent materialization of the same stage
is refused at once, naming the run that holds it, while the first completes with an intact metrics file; a stage
whose run worker died is taken over; the refusal is not retried."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from lineage_fixtures import record_training_upstream

from assets.training import stage_assets
from k5data.leases import LeaseRecord, acquire_lease, lease_key, put_if_absent, read_lease
from k5data.object_store import LocalStore
from orchestration.lineage import stage_dir
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource, TrainingJobResource
from orchestration.settings import K5Paths
from orchestration.stage_runs import hold_stage

STAGE = "video_lite_t2i_lr"
RESOURCES = {"k5_home": K5HomeResource(), "mlflow": MLflowResource(), "object_store": ObjectStoreResource(),
             "training_job": TrainingJobResource()}


def test_hold_stage_refuses_a_second_holder_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    out = tmp_path / "training" / STAGE
    with hold_stage(out, "Dagster run first-run-id"):
        with pytest.raises(dg.Failure) as refused:
            with hold_stage(out, "Dagster run second-run-id"):
                pytest.fail("a second holder got in")
        assert refused.value.allow_retries is False
        text = refused.value.description
        assert f"train_{STAGE} is already being materialized by Dagster run first-run-id" in text
        assert f".{STAGE}.partial" in text and "Wait for that run" in text
    with hold_stage(out, "Dagster run second-run-id") as lease:  # released: the next run gets it
        assert lease.took_over is None

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = LeaseRecord("Dagster run crashed-run", socket.gethostname(), dead.pid, "2026-01-01T00:00:00",
                         time.time() + 3600, 120.0, "tok")
    assert put_if_absent(LocalStore(out.parent), lease_key(f".{STAGE}.lock"), record.encode())
    with hold_stage(out, "Dagster run third-run-id") as lease:  # its worker is gone: no wait for the TTL
        assert lease.took_over.holder == "Dagster run crashed-run"


@pytest.mark.slow
def test_concurrent_materialization_of_one_stage_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tiny_t2v_dir: Path, tiny_t2i_dir: Path) -> None:
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    monkeypatch.setenv("K5_TRAIN_STEP_SLEEP_S", "0.7")
    instance = dg.DagsterInstance.ephemeral()
    paths = K5Paths.from_env().ensure()
    record_training_upstream(instance, paths.object_store, tiny_t2v_dir, tiny_t2i_dir)
    asset = [a for a in stage_assets if a.key.to_user_string() == f"train_{STAGE}"]
    run_config = {"ops": {f"train_{STAGE}": {"config": {"steps": 4, "ckpt_every": 0, "sample_every": None}}}}
    out = stage_dir(paths, STAGE)
    work = out.with_name(f".{STAGE}.partial")
    results: dict[str, dg.ExecuteInProcessResult] = {}

    def first() -> None:
        results["first"] = dg.materialize(asset, resources=RESOURCES, instance=instance, run_config=run_config,
                                          raise_on_error=False)

    runner = threading.Thread(target=first)
    runner.start()
    try:
        deadline = time.monotonic() + 180
        while not (work / "metrics.jsonl").exists():  # the first run is training
            assert runner.is_alive() and time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.05)
        holder = read_lease(LocalStore(out.parent), f".{STAGE}.lock")
        assert holder is not None and holder.holder.startswith("Dagster run ")
        started = time.monotonic()
        second = dg.materialize(asset, resources=RESOURCES, instance=instance, run_config=run_config,
                                raise_on_error=False)
        refused_after = time.monotonic() - started
        assert runner.is_alive()  # refused while the first is still running
    finally:
        runner.join(timeout=300)
    assert not second.success
    [failure] = [e for e in second.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    message = failure.event_specific_data.error.message
    assert f"already being materialized by {holder.holder}" in message and f"pid {holder.pid}" in message
    assert not [e for e in second.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert refused_after < 60  # at once, not after training

    assert results["first"].success
    assert holder.holder == f"Dagster run {results['first'].run_id}"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one run's steps, once each: nothing mixed in
    meta = results["first"].asset_materializations_for_node(f"train_{STAGE}")[0].metadata
    assert meta["steps"].value == 4 and not work.exists()
    assert read_lease(LocalStore(out.parent), f".{STAGE}.lock") is None  # released after publishing
    with acquire_lease(LocalStore(out.parent), f".{STAGE}.lock", holder="next", ttl_s=5):
        pass  # free for the next materialization


def test_rl_and_sft_materializations_are_refused_while_another_run_holds_their_folder(tmp_path: Path) -> None:
    """The one-writer rule covers the post-training assets too: ``reward_model`` / ``rl_model`` (rl_runs.run_tracked)
    and an SFT partition (sft_runs.run_partition) are refused, naming the holder, before anything is written."""
    from k5model.rl.jobs import RewardTrainJob
    from orchestration.rl_runs import run_tracked
    from orchestration.sft_runs import run_partition, sft_dir
    from orchestration.stage_runs import work_dir

    final = tmp_path / "models" / "rl" / "reward_model"
    job = RewardTrainJob(pairs="pairs.parquet", base_model="base", out=str(work_dir(final)))
    paths = K5Paths(tmp_path)
    sft_out = sft_dir(paths, "video_lite.people")

    @dg.asset(name="reward_model")
    def reward() -> None:
        run_tracked(dg.AssetExecutionContext.get(), None, None, "reward", job, final, {})

    @dg.asset(name="sft_models")
    def sft() -> None:
        run_partition(dg.AssetExecutionContext.get(), {"key": "video_lite.people"}, None, paths, None, None, None)

    for asset, out, name in ((reward, final, "reward_model"), (sft, sft_out, "sft_models[video_lite.people]")):
        with hold_stage(out, "Dagster run other-run-id"):
            result = dg.materialize([asset], raise_on_error=False)
        failure = result.failure_data_for_node(asset.op.name)
        text = str(failure.error)
        assert f"{name} is already being materialized by Dagster run other-run-id" in text, text
        assert not work_dir(out).exists()

    wrong = RewardTrainJob(pairs="pairs.parquet", base_model="base", out=str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match=r"must write into .*\.reward_model\.partial"):
        run_tracked(dg.build_asset_context(), None, None, "reward", wrong, final, {})


def test_reward_pairs_is_refused_while_held_and_only_a_completed_run_replaces_the_table(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """``reward_pairs`` writes aside under the one-writer lease: refused (naming the holder) while another run holds
    it; a run that dies mid-generation leaves the last good table and images untouched; a completed run is
    swapped in whole."""
    import pandas as pd

    import k5data.reward_pairs as library
    from assets.rl import reward_pairs
    from orchestration.stage_runs import work_dir

    out = tmp_path / "models" / "rl" / "reward_pairs"
    (out / "images").mkdir(parents=True)
    (out / "pairs.parquet").write_text("last good table")
    (out / "images" / "item0.real.png").write_text("last good image")
    resources = {"k5_home": K5HomeResource(home=str(tmp_path))}
    item = {"item_id": "item0", "caption": "a fox", "kind": "image", "media_path": "x.png"}
    pd.DataFrame([item]).to_parquet(tmp_path / "items.parquet")

    @dg.asset(name="sft_soup")
    def soup() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"start_pipeline": "pre", "pipeline_dir": "sft", "start_stage": "s",
                                              "family": "video_lite"})

    @dg.asset(name="sft_mix")
    def mix() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"path": str(tmp_path / "items.parquet")})

    def dies(rows, pretrain, sft, work, settings, log):
        (work / "images").mkdir(parents=True)
        (work / "images" / "item0.real.png").write_text("half written")
        raise RuntimeError("generation died")

    def completes(rows, pretrain, sft, work, settings, log):
        (work / "images").mkdir(parents=True)
        (work / "images" / "item0.real.png").write_text("new image")
        (work / "pairs.parquet").write_text("new table")
        return {"items": len(rows), "pairs": 6, "settings": {}}

    instance = dg.DagsterInstance.ephemeral()
    with hold_stage(out, "Dagster run other-run-id", asset="reward_pairs"):
        held = dg.materialize([soup, mix, reward_pairs], resources=resources, instance=instance,
                              raise_on_error=False)
    assert "reward_pairs is already being materialized by Dagster run other-run-id" in \
        str(held.failure_data_for_node("reward_pairs").error)
    monkeypatch.setattr(library, "build_reward_pairs", dies)
    failed = dg.materialize([soup, mix, reward_pairs], resources=resources, instance=instance, raise_on_error=False)
    assert not failed.success
    assert (out / "pairs.parquet").read_text() == "last good table"
    assert (out / "images" / "item0.real.png").read_text() == "last good image"
    monkeypatch.setattr(library, "build_reward_pairs", completes)
    done = dg.materialize([soup, mix, reward_pairs], resources=resources, instance=instance)
    assert (out / "pairs.parquet").read_text() == "new table" and not work_dir(out).exists()
    assert (out / "images" / "item0.real.png").read_text() == "new image"
    meta = done.asset_materializations_for_node("reward_pairs")[0].metadata
    assert meta["path"].value == str(out / "pairs.parquet") and meta["items"].value == 1

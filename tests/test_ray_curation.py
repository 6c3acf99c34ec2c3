"""Curation on a local Ray cluster (head + one worker on 127.0.0.1): the same dataset as in-process, and a worker
killed after committing its writes is retried with no lost and no duplicated rows."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from k5data.curation.catalog import Catalog
from k5data.curation.config import load_config
from k5data.curation.corpus import build_sample_corpus
from k5data.curation.curate import run_curation
from k5data.curation.output import read_dataset
from k5data.curation.ray_exec import (
    TASK_MARKER_DIR_ENV,
    TASK_SLEEP_ENV,
    InProcessExecutor,
    RayExecutor,
    ShardWork,
    run_shard_work,
)
from orchestration.ray_curation import local_ray_cluster

pytestmark = pytest.mark.slow
TASK_SLEEP_S = 3.0  # every task pauses after committing its writes: the window in which the test kills its worker
KEY = ["source_uri", "scene_index"]


def _table(out: Path) -> pd.DataFrame:
    frame = read_dataset(str(out), load_config())
    return frame.sort_values(KEY).reset_index(drop=True)


def test_unknown_step_is_refused() -> None:
    work = ShardWork(step="embed", source_root="/x", catalog_path="/x.duckdb", cfg=dict(load_config()), shard=0)
    with pytest.raises(ValueError, match="embed"):
        InProcessExecutor().map(run_shard_work, [work])


def test_ray_curation_matches_in_process_and_survives_a_killed_worker(tmp_path: Path) -> None:
    corpus = build_sample_corpus(tmp_path / "corpus", videos=False)
    cfg = load_config()
    local = run_curation(str(corpus), str(tmp_path / "local"), cfg, catalog_path=str(tmp_path / "local.duckdb"),
                         progress=False)
    expected = _table(tmp_path / "local")
    assert len(expected) > 5 and expected["passed"].any() and not expected["passed"].all()

    markers = tmp_path / "markers"
    env = {TASK_MARKER_DIR_ENV: str(markers), TASK_SLEEP_ENV: str(TASK_SLEEP_S)}
    killed: list[int] = []

    def kill_first_worker() -> None:  # SIGKILL the process of the first task that committed its writes
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            done = sorted(markers.glob("*")) if markers.exists() else []
            if done:
                pid = json.loads(done[0].read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)

    with local_ray_cluster(workers=1, env=env) as cluster:
        assert cluster.nodes == 2
        killer = threading.Thread(target=kill_first_worker, daemon=True)
        killer.start()
        start = time.perf_counter()
        summary = run_curation(str(corpus), str(tmp_path / "ray"), cfg, catalog_path=str(tmp_path / "ray.duckdb"),
                               executor=RayExecutor(address=cluster.address), progress=False)
        seconds = time.perf_counter() - start
        killer.join(timeout=5)

    assert killed, "no task reached its pause: the kill did not happen"
    tasks = 2 * cfg["shards"]  # one register and one score task per shard
    attempts = len(list(markers.glob("*")))
    assert attempts == tasks + 1, f"{attempts} task completions for {tasks} tasks and one retry"
    got = _table(tmp_path / "ray")
    assert not got.duplicated(KEY).any()
    pd.testing.assert_frame_equal(got, expected, check_like=True)
    assert summary.dataset["rows"] == local.dataset["rows"]
    assert Catalog(tmp_path / "ray.duckdb").counts() == Catalog(tmp_path / "local.duckdb").counts()
    # Throughput per worker process: media scored per second of scoring-task time (the test pauses excluded).
    records = [json.loads(p.read_text()) for p in markers.glob("*")]
    scoring = [r for r in records if r["step"] == "score" and r["pid"] not in killed]
    media, busy = sum(r["scored_media"] for r in scoring), sum(r["seconds"] for r in scoring)
    assert media == local.scored_media
    print(f"\nray curation: {media} media scored in {busy:.1f} s of task time "
          f"({media / busy:.2f} media/s per worker process); whole Ray run {seconds:.1f} s on {cluster.nodes} nodes "
          f"({TASK_SLEEP_S:.0f} s test pause per task); in-process {local.seconds:.1f} s")

"""The production instance's run-queue limits (infra/dagster.yaml), decided by Dagster's own counter the way its
QueuedRunCoordinator daemon decides which queued run may start."""

from __future__ import annotations

from pathlib import Path

import yaml
from dagster import DagsterRun
from dagster._utils.tags import TagConcurrencyLimitsCounter

REPO = Path(__file__).resolve().parents[1]


def _limits() -> list[dict]:
    return yaml.safe_load((REPO / "infra/dagster.yaml").read_text())["concurrency"]["runs"]["tag_concurrency_limits"]


def _run(job: str, **tags: str) -> DagsterRun:
    return DagsterRun(job_name=job, tags=tags)


def test_a_partition_runs_once_at_a_time_and_other_partitions_are_not_held() -> None:
    running = [_run("sft_models_job", **{"dagster/partition": "video/nature"})]
    counter = TagConcurrencyLimitsCounter(_limits(), running)
    assert counter.is_blocked(_run("sft_models_job", **{"dagster/partition": "video/nature"}))
    assert not counter.is_blocked(_run("sft_models_job", **{"dagster/partition": "video/people"}))
    assert not counter.is_blocked(_run("main_job"))  # unpartitioned runs are not limited by it


def test_a_backfill_holds_at_most_eight_runs() -> None:
    running = [_run("curation_job", **{"dagster/backfill": "bf1", "dagster/partition": f"shard-{i:04d}"})
               for i in range(8)]
    counter = TagConcurrencyLimitsCounter(_limits(), running)
    assert counter.is_blocked(_run("curation_job", **{"dagster/backfill": "bf1", "dagster/partition": "shard-0009"}))
    assert not counter.is_blocked(_run("curation_job", **{"dagster/backfill": "bf2",
                                                          "dagster/partition": "shard-0009"}))

"""Per-shard curation work (registration, probing, scoring) as Ray tasks, or in this process.

A step for one shard is a plain ``ShardWork`` value; ``run_shard_work`` does it against the shared DuckDB catalog.
Ray retries a task whose worker died (``max_retries``); the retry is safe because every catalog write is a keyed
upsert (locations by URI, media by content hash, a media file's rows replaced together with its ``scored`` mark in one
transaction), so a retried step only does what an earlier attempt did not commit. On a cluster the catalog file and
the source must be reachable from every worker (a shared volume; the source may be ``s3://``).

No Dagster here: ``orchestration.resources.CurationResource`` picks the executor from its ``ray_address``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from k5data.curation.catalog import Catalog
from k5data.curation.config import CurationConfig
from k5data.curation.curate import score_pending
from k5data.curation.register import RegisterStats, register_sources
from k5data.sources import Source

_In = TypeVar("_In")
_Out = TypeVar("_Out")

# Tests: after a task's work is committed, write a JSON record (pid, step, seconds, counts) into this folder and
# sleep, so a test can kill the worker between the catalog writes and the task's result (where a retry could duplicate
# rows).
TASK_MARKER_DIR_ENV = "K5_CURATION_TASK_MARKERS"
TASK_SLEEP_ENV = "K5_CURATION_TASK_SLEEP_S"


class ShardExecutor(Protocol):
    """Runs ``fn`` once per item, possibly in other processes or machines; results in input order."""

    def map(self, fn: Callable[[_In], _Out], items: Sequence[_In]) -> list[_Out]: ...


@dataclass(frozen=True, kw_only=True)
class ShardWork:
    """One source shard's registration or scoring, as plain picklable values (a Ray task's argument)."""

    step: str
    """``register`` (list, probe, hash and catalog the shard's new files) or ``score`` (its unscored media)."""
    source_root: str
    """Folder or ``s3://bucket/prefix`` of the source."""
    catalog_path: str
    """The DuckDB catalog file; every process running a step must reach it."""
    cfg: dict
    """The curation config (``CurationConfig`` contents)."""
    shard: int
    """Source shard (``k5data.sources.shard_of``) this call covers."""


STEPS = ("register", "score")


def run_shard_work(work: ShardWork) -> dict[str, Any]:
    """Do one step for one shard; returns its counts (``RegisterStats`` fields, or scored media / rows / errors)."""
    if work.step not in STEPS:
        raise ValueError(f"ShardWork.step={work.step!r} is not one of {STEPS}")
    start = time.perf_counter()
    cfg = CurationConfig(work.cfg)
    source = Source(work.source_root, cfg.endpoint_url, cfg.section("s3")["region"], retry=cfg.retry_policy)
    catalog = Catalog(work.catalog_path)
    if work.step == "register":
        result = asdict(register_sources(source, catalog, cfg, work.shard))
    else:
        media_n, rows_n, errors = score_pending(source, catalog, cfg, work.shard)
        result = {"scored_media": media_n, "rows": rows_n, "errors": errors}
    _test_pause(work, time.perf_counter() - start, result)
    return result


def _test_pause(work: ShardWork, seconds: float, result: dict[str, Any]) -> None:
    marker_dir, sleep_s = os.environ.get(TASK_MARKER_DIR_ENV), float(os.environ.get(TASK_SLEEP_ENV, "0") or 0)
    if marker_dir:
        Path(marker_dir).mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "step": work.step, "shard": work.shard, "seconds": seconds, **result}
        (Path(marker_dir) / f"{time.time_ns()}-{os.getpid()}.json").write_text(json.dumps(record))
    if sleep_s > 0:
        time.sleep(sleep_s)


class InProcessExecutor:
    """Runs every call here, one after another."""

    def map(self, fn: Callable[[_In], _Out], items: Sequence[_In]) -> list[_Out]:
        return [fn(item) for item in items]


@dataclass(frozen=True, kw_only=True)
class RayExecutor:
    """Runs every call as a Ray task on the cluster at ``address`` (connects on first use, once per process)."""

    address: str
    """Ray cluster address, e.g. ``ray://head:10001`` (Ray client) or ``10.0.0.5:6379`` (a node of the cluster)."""
    num_cpus: float = 1.0
    """CPUs one task reserves (one task per shard step; a worker runs ``its CPUs / num_cpus`` tasks at once)."""
    num_gpus: float = 0.0
    """GPUs one task reserves (scoring with model backends on GPU workers)."""
    max_retries: int = 3
    """How often Ray re-runs a task whose worker or node died (safe: see the module docstring)."""

    def map(self, fn: Callable[[_In], _Out], items: Sequence[_In]) -> list[_Out]:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries)(fn)
        return ray.get([remote.remote(item) for item in items])


def register_and_score(executor: ShardExecutor, src: str, catalog_path: str | os.PathLike, cfg: CurationConfig,
                       shard: int | None = None) -> tuple[RegisterStats, int, int, int]:
    """Register then score every shard (or one) on ``executor``; returns (summed register stats, media scored, rows,
    scoring errors)."""
    shards = range(cfg["shards"]) if shard is None else [shard]
    common = dict(source_root=src, catalog_path=str(catalog_path), cfg=dict(cfg))
    registered = executor.map(run_shard_work, [ShardWork(step="register", shard=s, **common) for s in shards])
    stats = RegisterStats()
    for part in registered:
        for name, value in part.items():
            if name == "reasons":
                for reason, n in value.items():
                    stats.reasons[reason] = stats.reasons.get(reason, 0) + n
            else:
                setattr(stats, name, getattr(stats, name) + value)
    scored = executor.map(run_shard_work, [ShardWork(step="score", shard=s, **common) for s in shards])
    return (stats, sum(p["scored_media"] for p in scored), sum(p["rows"] for p in scored),
            sum(p["errors"] for p in scored))

"""How a Table 4 stage asset runs its training job: build the ``TrainJob`` from the lineage (parent weights, the
curated latent shards, the base pipeline), run it through Pipes into a ``.partial`` work folder that survives
failures (the next attempt resumes from its last sharded checkpoint), and publish the folder only when the job
completed. MLflow: one run per attempt under the chain's lineage run, linked back to the Dagster run and asset.

One materialization of a stage at a time: ``hold_stage`` takes a lease on the stage's folder (``k5data.leases``, at
``training/.<stage>.lock/``) before the work folder is touched and keeps it until the publish; a second run of the
same stage fails at once, naming the run that holds it, and leaves the first one's work folder and metrics intact.
A run worker that died (its pid gone, or the lease unrenewed for its TTL) is taken over by the next attempt.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from k5data.leases import Lease, LeaseHeld, acquire_lease
from k5data.object_store import LocalStore
from k5model.checkpoint import replace_dir
from k5model.training.job import TrainJob
from k5model.training.stages import TableStage, demo_scaling, get_table_stage
from orchestration.lineage import latest_metadata, stage_dir
from orchestration.settings import K5Paths

# Table 4 resolutions (pixels, short side) -> the latent shards' resolution classes (k5data.latents)
CLASS_OF_SHORT_SIDE = {256: "low", 512: "medium", 1024: "high"}
# Fields that may differ between attempts of one stage without invalidating its checkpoints.
RESUMABLE_CHANGES = {"resume", "steps", "sample_every", "sample_steps", "sample_cache", "nproc", "replicate",
                     "prefetch", "async_checkpoint"}  # how, not what, it trains
DAGSTER_UI_URL = "http://127.0.0.1:3000"


@dataclass(frozen=True, kw_only=True)
class StageInputs:
    """What the lineage hands a stage: the config values of its asset and the upstream materializations."""

    stage: str
    chain: str
    steps: int
    demo: bool
    ckpt_every: int
    init: str | None
    base_pipeline: str
    shard_meta: dict[str, Any]
    store_uri: str
    lr: float | None = None  # peak learning rate instead of the stage's
    nproc: int = 1
    replicate: int = 1
    offload_activations: bool = False
    sample_every: int | None = 0
    sample_steps: int = 2
    prompts_file: str | None = None
    sample_cache: str | None = None


def stage_res_classes(table: TableStage) -> list[str]:
    """Shard classes of a stage's Table 4 resolutions (by their short side)."""
    sides = {min(int(v) for v in key.split("x")) for key in table.resolutions}
    return sorted({CLASS_OF_SHORT_SIDE.get(min(CLASS_OF_SHORT_SIDE, key=lambda s: abs(s - side))) for side in sides})


def shard_classes(table: TableStage, shard_meta: dict[str, Any]) -> tuple[list[str], str]:
    """The classes a stage reads and why: its own when the shards hold them, else every class the shards hold (the
    demo corpus has few sizes), said in the reason."""
    wanted = stage_res_classes(table)
    modality = "video" if table.is_video and set(table.tasks) != {"t2i"} else "image"
    present = sorted({c for m, c in shard_meta.get("classes", []) if m == modality})
    if set(wanted) & set(present):
        return sorted(set(wanted) & set(present)), f"Table 4 classes {wanted}"
    return present, f"Table 4 classes {wanted} absent from the shards ({modality}: {present}); reading all of them"


def build_job(inputs: StageInputs, work: Path) -> tuple[TrainJob, str]:
    """The stage's TrainJob (writing into ``work``, resuming from it) and the reason for its shard classes."""
    table = get_table_stage(inputs.stage)
    classes, why = shard_classes(table, inputs.shard_meta)
    sampling = inputs.sample_every is not None
    attention = None
    if inputs.demo and table.attention == "nabla":
        # demo latents (buckets / 8) are smaller than NABLA's 8x8-token tiles; production sizes tile exactly
        attention, why = "regular", why + "; dense attention: demo latents are too small for NABLA's 8x8-token tiles"
    job = TrainJob.from_flat(
        stage=inputs.stage, demo=inputs.demo, attention=attention, steps=inputs.steps, lr=inputs.lr, out=str(work),
        resume=True,
        ckpt_every=inputs.ckpt_every, base_pipeline=inputs.base_pipeline, init=inputs.init,
        shards=str(inputs.shard_meta["prefix"]), store=inputs.store_uri, text_encoders=inputs.base_pipeline,
        res_classes=",".join(classes) or None, nproc=inputs.nproc, replicate=inputs.replicate,
        offload_activations=inputs.offload_activations, sample_every=inputs.sample_every,
        sample_pipeline=inputs.base_pipeline if sampling else None,
        sample_prompts=inputs.prompts_file if sampling else None, sample_steps=inputs.sample_steps,
        sample_cache=inputs.sample_cache if sampling else None)
    return job, why


STAGE_LEASE_TTL_S = 120.0  # renewed every 40 s by the run worker; a dead worker's lease is taken over after this


def work_dir(out: Path) -> Path:
    """Where a job writes before it is published as ``out`` (a failed attempt never replaces the last good folder;
    the next attempt may resume from it)."""
    return out.with_name(f".{out.name}.partial")


@contextlib.contextmanager
def hold_stage(out: Path, holder: str, ttl_s: float = STAGE_LEASE_TTL_S, asset: str | None = None) -> Iterator[Lease]:
    """The one-materialization lease of the folder ``out`` (a training stage, an SFT partition, a distillation or RL
    asset; ``asset`` names it in the refusal, default ``train_<stage>``); ``dg.Failure`` (not retried) when another
    run holds it."""
    name = asset or f"train_{out.name}"
    try:
        with acquire_lease(LocalStore(out.parent), f".{out.name}.lock", holder=holder, ttl_s=ttl_s) as lease:
            yield lease
    except LeaseHeld as err:
        raise dg.Failure(f"{name} is already being materialized by {err.record.describe()}: refusing to run "
                         f"it twice at once (they would share {work_dir(out)}). Wait for that run "
                         "to finish or cancel it, then materialize again", allow_retries=False) from None


def prepare_work(work: Path, job: TrainJob, log: Any) -> bool:
    """Keep a failed attempt's work folder when it trained the same job (the next attempt resumes from its
    checkpoints); start afresh when the job changed. Returns whether checkpoints are kept."""
    saved = work / "job.json"
    if saved.exists():
        before = TrainJob.from_json(saved.read_text()).flat()
        changed = sorted(k for k, v in job.flat().items() if k not in RESUMABLE_CHANGES and before.get(k) != v)
        if not changed:
            log.info(f"resuming the previous attempt in {work}")
            return True
        log.info(f"discarding {work}: the job changed ({', '.join(changed)})")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    saved.write_text(job.to_json())
    return False


def publish(work: Path, out: Path, rewrite: tuple[str, ...] = ()) -> None:
    """Replace the stage's last good folder by the completed work folder (only a completed job gets here), in one
    swap: readers see the previous stage folder or the new one, never neither. The JSON files named in ``rewrite``
    (flat objects the job wrote) get their paths inside ``work`` turned into the same paths inside ``out`` first,
    so a published record never points into the work folder that no longer exists."""
    for name in rewrite:
        record = json.loads((work / name).read_text())
        record = {k: v.replace(str(work), str(out)) if isinstance(v, str) else v for k, v in record.items()}
        (work / name).write_text(json.dumps(record, indent=2))
    replace_dir(work, out)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


TREND_MIN_STEPS = 12  # below this a loss trend is noise (demo stages run a handful of steps on different batches)


def loss_problems(losses: list[float]) -> list[str]:
    """What is wrong with a stage's per-step losses: none logged, a non-finite one, or (with enough steps to tell)
    a last quarter whose mean is above the first quarter's."""
    if not losses:
        return ["no step was logged"]
    bad = [i + 1 for i, x in enumerate(losses) if not math.isfinite(x)]
    if bad:
        return [f"non-finite loss at steps {bad[:5]}"]
    if len(losses) >= TREND_MIN_STEPS:
        q = len(losses) // 4
        first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
        if last > first:
            return [f"loss rose: last-quarter mean {last:.4g} > first-quarter mean {first:.4g}"]
    return []


def mlflow_params(inputs: StageInputs, job: TrainJob) -> dict[str, Any]:
    """MLflow params of a stage run: the stage config that trains (demo scaling or the Table 4 row) and the job."""
    import dataclasses

    table = get_table_stage(inputs.stage)
    trained = dataclasses.asdict(demo_scaling(inputs.stage, steps=inputs.steps)) if inputs.demo else \
        dataclasses.asdict(table)
    return {**{f"stage.{k}": v for k, v in trained.items()}, **{f"job.{k}": v for k, v in job.flat().items()},
            "stage": inputs.stage, "parent": table.parent or "", "init": inputs.init or "random",
            "table4_row": table.row}


def run_stage(context: dg.AssetExecutionContext, inputs: StageInputs, paths: K5Paths, mlflow: Any,
              training_job: Any, system_metrics_interval_s: float) -> dict[str, Any]:
    """Train one stage through Pipes and publish it; returns the materialization metadata."""
    out = stage_dir(paths, inputs.stage)
    work = work_dir(out)
    job, why = build_job(inputs, work)
    with hold_stage(out, f"Dagster run {context.run_id}") as lease:
        return _run_held(context, inputs, job, why, out, work, lease, mlflow, training_job, system_metrics_interval_s)


def _run_held(context: dg.AssetExecutionContext, inputs: StageInputs, job: TrainJob, why: str, out: Path, work: Path,
              lease: Lease, mlflow: Any, training_job: Any, system_metrics_interval_s: float) -> dict[str, Any]:
    """``run_stage`` under the stage's lease: prepare the work folder, train, publish."""
    if lease.took_over is not None:
        context.log.warning(f"took over the stale lease of train_{inputs.stage} held by {lease.took_over.describe()}")
    resumed = prepare_work(work, job, context.log)
    asset = context.asset_key.to_user_string()
    tags = {"dagster_asset": asset, "dagster_run_url": f"{DAGSTER_UI_URL}/runs/{context.run_id}",
            "k5_shard_index_uri": str(inputs.shard_meta.get("index_uri", "")),
            "k5_dataset_snapshot": str(inputs.shard_meta.get("dataset_snapshot", "")),
            "k5_shard_classes": job.data.res_classes or "all", "k5_shard_classes_reason": why}
    run_id = mlflow.start_stage_run(inputs.chain, inputs.stage, context.run_id, mlflow_params(inputs, job), tags)
    env = {"MLFLOW_TRACKING_URI": mlflow.resolved_tracking_uri(), "K5_MLFLOW_RUN_ID": run_id,
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": str(system_metrics_interval_s)}
    try:
        reported = training_job.run(context, job, env).get_materialize_result()
    except BaseException:
        mlflow.end_stage_run(run_id, failed=True)  # the run keeps every step the job logged before failing
        raise
    lease.check()  # never publish over a run that took the stage over
    publish(work, out)
    metrics = read_metrics(out / "metrics.jsonl")
    consumed = {"samples_consumed": int(sum(m.get("samples", 0) for m in metrics)),
                "tokens_consumed": int(sum(m.get("tokens", 0) for m in metrics))}
    url = mlflow.end_stage_run(run_id, tags={"k5_checkpoint_uri": (out / "ema" / "transformer").as_uri(),
                                             "k5_pipeline_uri": (out / "pipeline").as_uri(),
                                             **{f"k5_{k}": str(v) for k, v in consumed.items()}})
    return {**dict(reported.metadata or {}), **consumed, "mlflow_run": dg.MetadataValue.url(url),
            "mlflow_run_id": run_id, "pipeline_dir": str(out / "pipeline"),
            "transformer_dir": str(out / "ema" / "transformer"), "resumed_attempt": resumed,
            "shard_index_uri": str(inputs.shard_meta.get("index_uri", "")), "shard_classes": job.data.res_classes
            or "all", "dataset_snapshot": str(inputs.shard_meta.get("dataset_snapshot", "")),
            "final_loss": metrics[-1]["loss"] if metrics else math.nan, "steps": len(metrics)}


def parent_init(context: dg.AssetExecutionContext, parent: str | None, init_from: str | None) -> str | None:
    """Starting weights: an explicit released checkpoint, else the parent stage's recorded EMA transformer."""
    if init_from:
        return init_from
    if parent is None:
        return None
    path = Path(str(latest_metadata(context, f"train_{parent}")["transformer_dir"]))
    if not path.exists():
        raise dg.Failure(f"starting weights {path} of train_{parent} are gone; materialize train_{parent} again")
    return str(path)

"""How a distillation asset (``cfg_distilled``, ``tscd_16nfe``, ``flash``, ``magcache_calibration``) runs: on the
stages' path. One typed ``TrainJob`` (its ``distill`` section names the stage, the teacher and the upstream folder)
goes through ``TrainingJobResource`` (Pipes: a local subprocess or a GPU pod running ``orchestration.pipes_train``,
whose composition root hands it to ``k5cli.distill_run``) into a ``.partial`` work folder under the stage's lease;
only a completed job is published (swapped in whole) as ``models/distill/<asset>/`` with its ``pipeline/`` folder,
whose ``sampling_config.json`` carries the model's own sampling settings. MLflow: one run per attempt under the
``distillation`` lineage run, with the per-step losses logged live by the job and the figures at the end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from k5model.training.job import TrainJob
from orchestration.settings import K5Paths
from orchestration.stage_runs import hold_stage, prepare_work, publish, read_metrics, work_dir

DISTILL_CHAIN = "distillation"  # MLflow lineage run the distillation runs nest under
STAGE_KIND = {"cfg_distilled": "cfg_distilled", "tscd_16nfe": "tscd", "flash": "flash",
              "magcache_calibration": "magcache_calibration"}  # asset -> k5model.distill stage kind


@dataclass(frozen=True, kw_only=True)
class DistillInputs:
    """What the lineage hands a distillation asset: its config and the upstream pipeline folders."""

    asset: str
    """The asset (a key of ``STAGE_KIND``)."""
    teacher_pipeline: str
    """The guided base model's pipeline folder (the teacher stage's export)."""
    upstream_pipeline: str
    """The folder the student starts from (the teacher for cfg_distilled and magcache_calibration)."""
    teacher_stage: str
    """The teacher's asset (recorded in MLflow and the metadata)."""
    train_steps: int
    lr: float
    reference_steps: int
    train_seeds: int
    latent_frames: int

    @property
    def kind(self) -> str:
        return STAGE_KIND[self.asset]


def distill_dir(paths: K5Paths, asset: str) -> Path:
    """Published folder of a distillation asset: ``pipeline/``, ``metrics.jsonl``, ``distill_metrics.json``."""
    return paths.models / "distill" / asset


def build_distill_job(inputs: DistillInputs, work: Path) -> TrainJob:
    """The asset's TrainJob, writing into ``work``."""
    return TrainJob.from_flat(
        stage="tiny_demo", steps=inputs.train_steps, lr=inputs.lr, out=str(work), ckpt_every=0,
        base_pipeline=inputs.teacher_pipeline, distill=inputs.kind, distill_teacher=inputs.teacher_pipeline,
        distill_from=inputs.upstream_pipeline, distill_reference_steps=inputs.reference_steps,
        distill_seeds=inputs.train_seeds, distill_latent_frames=inputs.latent_frames)


def _figures(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if k.startswith("mse_") or k.endswith(("_mse", "per_sample", "uncached"))}


def run_distill(context: dg.AssetExecutionContext, inputs: DistillInputs, paths: K5Paths, mlflow: Any,
                training_job: Any) -> dict[str, Any]:
    """Run one distillation stage through Pipes and publish it; returns the materialization metadata."""
    out = distill_dir(paths, inputs.asset)
    work = work_dir(out)
    job = build_distill_job(inputs, work)
    with hold_stage(out, f"Dagster run {context.run_id}", asset=inputs.asset) as lease:
        prepare_work(work, job, context.log)
        params = {**{f"job.{k}": v for k, v in job.flat().items()}, "kind": inputs.kind,
                  "teacher_stage": inputs.teacher_stage}
        run_id = mlflow.start_stage_run(DISTILL_CHAIN, inputs.asset, context.run_id, params, {
            "dagster_asset": inputs.asset, "k5_kind": inputs.kind, "k5_teacher_stage": inputs.teacher_stage})
        env = {"MLFLOW_TRACKING_URI": mlflow.resolved_tracking_uri(), "K5_MLFLOW_RUN_ID": run_id}
        try:
            reported = training_job.run(context, job, env).get_materialize_result()
        except BaseException:
            mlflow.end_stage_run(run_id, failed=True)
            raise
        lease.check()
        publish(work, out, rewrite=("distill_metrics.json",))
    result = json.loads((out / "distill_metrics.json").read_text())
    figures = _figures(result)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow.resolved_tracking_uri())
    for name, value in figures.items():
        client.log_metric(run_id, name, value)
    client.log_dict(run_id, result["sampling"], "sampling_config.json")
    url = mlflow.end_stage_run(run_id, tags={"k5_pipeline_uri": (out / "pipeline").as_uri(),
                                             "k5_nfe": str(result["sampling"]["num_steps"])})
    metrics = read_metrics(out / "metrics.jsonl")
    sampling = result["sampling"]
    return {**{k: v for k, v in dict(reported.metadata or {}).items() if k in ("seconds", "steps_run")},
            **figures, "pipeline_dir": str(out / "pipeline"), "path": str(out / "pipeline"), "kind": inputs.kind,
            "nfe": sampling["num_steps"], "guidance_scale": sampling["guidance_scale"],
            "sampling": dg.MetadataValue.json(sampling), "teacher_stage": inputs.teacher_stage,
            "teacher_pipeline": inputs.teacher_pipeline, "upstream_pipeline": inputs.upstream_pipeline,
            "mlflow_run": dg.MetadataValue.url(url), "mlflow_run_id": run_id, "steps": len(metrics),
            "final_loss": metrics[-1]["loss"] if metrics else math.nan}

"""A distillation ``TrainJob`` (``job.distill.distill`` set) run by the training composition root: what
``k5 train --distill KIND`` and the Dagster distillation assets (through the stages' Pipes job) hand to
``k5model.distill.export.run_distill_stage``.

The run folder (``job.checkpoint.out``) gets ``pipeline/`` (the complete exported pipeline with its
``sampling_config.json`` and ``distill_metrics.json``), ``metrics.jsonl`` (one line per optimiser step) and
``distill_metrics.json`` (the stage's figures, read back by the orchestration layer). A distillation stage runs in one
process and restarts from its upstream folder (no sharded checkpoints: at production scale it is hours, not days).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from k5model.training.job import TrainJob

DISTILL_METRICS = "distill_metrics.json"


def distill_spec(job: TrainJob) -> Any:
    """The ``DistillStageSpec`` of a distillation job (its steps and lr; demo-scale defaults otherwise)."""
    from k5model.distill.export import DistillStageSpec

    d = job.distill
    kw: dict[str, Any] = {"train_steps": job.stage.steps} if job.stage.steps is not None else {}
    if job.stage.lr is not None:
        kw["lr"] = job.stage.lr
    if job.stage.batch is not None:
        kw["batch_size"] = job.stage.batch
    return DistillStageSpec(kind=str(d.distill), reference_steps=d.distill_reference_steps,
                            train_seeds=d.distill_seeds, latent_grid=(d.distill_latent_frames, 16, 16), **kw)


class _StepFanout:
    """Each optimiser step's metrics to every callback (a ``loss`` added for the adversarial stage: its G loss)."""

    def __init__(self, callbacks: list[Any], metrics_file: Path):
        self.callbacks, self.metrics_file = callbacks, metrics_file
        metrics_file.write_text("")  # a re-run starts the stage afresh

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        if "loss" not in metrics and "g_loss" in metrics:
            metrics["loss"] = metrics["g_loss"]
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for cb in self.callbacks:
            cb.on_step(step, dict(metrics))


def run_distill_job(job: TrainJob, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Run the job's distillation stage into ``job.checkpoint.out``; the composition root's result dict plus
    ``distill`` (the stage's figures and sampling settings)."""
    from k5model.distill.export import run_distill_stage

    d = job.distill
    if job.parallel.nproc > 1:
        raise SystemExit(f"distillation runs in one process; got nproc={job.parallel.nproc} (drop --nproc)")
    out = Path(job.checkpoint.out)
    out.mkdir(parents=True, exist_ok=True)
    for flag, folder in (("distill_teacher", d.distill_teacher), ("distill_from", d.distill_from)):
        if folder and not (Path(folder) / "model_index.json").is_file():
            raise SystemExit(f"{flag} {folder}: not a pipeline folder (no model_index.json); point it at an "
                             "exported pipeline/ folder")
    spec = distill_spec(job)
    fanout = _StepFanout(list(callbacks or []), out / "metrics.jsonl")
    result = run_distill_stage(spec, base_dir=str(d.distill_teacher), upstream_dir=d.distill_from or
                               str(d.distill_teacher), out_dir=out / "pipeline", on_step=fanout)
    (out / DISTILL_METRICS).write_text(json.dumps(result, indent=2, default=str))
    final = result.get("final_loss")
    return {"stage": f"distill:{d.distill}", "step": int(result["steps_trained"]), "world_size": 1,
            "resumed_from": None, "skipped_checkpoints": [],
            "final_loss": math.nan if final is None else float(final), "distill": result}

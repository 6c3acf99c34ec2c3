"""Subprocess / pod side of a training stage launched by Dagster Pipes.

``python -m orchestration.pipes_train --job JOB`` (JOB: ``TrainJob`` JSON, inline or a file; or under ``torchrun``):
runs the same composition root (``k5cli.train_run``) as ``k5 train``. Rank 0 streams every step's metrics back to
Dagster as Pipes log lines, logs them live to the stage's MLflow run when ``K5_MLFLOW_RUN_ID`` names one (see
``orchestration.mlflow_tracking``), and reports the stage's summary as materialization metadata. The other ranks only
train. Kept outside ``k5model`` so the model library never imports Dagster or MLflow code.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, open_dagster_pipes


class PipesStepReporter:
    """Trainer callback: one Pipes log line per step, plus running totals for the summary."""

    def __init__(self, pipes: PipesContext):
        self.pipes = pipes
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] = {}
        self.steps = 0
        self.tokens_per_s: list[float] = []
        self.t0 = time.perf_counter()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.first = self.first or dict(metrics)
        self.last = dict(metrics)
        self.steps += 1
        if "tokens_per_s" in metrics:
            self.tokens_per_s.append(float(metrics["tokens_per_s"]))
        self.pipes.log.info(json.dumps({"step": step, **metrics}))

    def summary(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.t0
        loss = self.last.get("loss", math.nan)
        # the first step pays for warm-up (allocations, compilation): leave it out when there are others
        rates = self.tokens_per_s[1:] or self.tokens_per_s
        return {"final_loss": float(loss), "first_loss": float((self.first or {}).get("loss", math.nan)),
                "steps_run": self.steps, "seconds": round(seconds, 3),
                "steps_per_s": round(self.steps / seconds, 3) if seconds > 0 else 0.0,
                "tokens_per_s": round(statistics.median(rates), 3) if rates else math.nan,
                "peak_mem_gib": float(self.last.get("peak_mem_gib", math.nan))}


def run_reported(pipes: PipesContext, out_dir: Path,
                 train: Callable[[list[Any]], Any]) -> tuple[Any, PipesStepReporter, Any]:
    """``train(callbacks)`` with the Pipes step reporter and, when ``K5_MLFLOW_RUN_ID`` names a run, the MLflow step
    logger (ended FAILED if training raises, FINISHED otherwise). Returns (train's result, reporter, logger or None);
    the RL jobs (``orchestration.pipes_rl``) report the same way."""
    from orchestration.mlflow_tracking import MLflowStepLogger

    reporter = PipesStepReporter(pipes)
    tracker = MLflowStepLogger.from_env(out_dir)
    try:
        result = train([reporter, *([tracker] if tracker else [])])
    except BaseException:
        if tracker is not None:
            tracker.finish(failed=True)
        raise
    if tracker is not None:
        tracker.finish()
    return result, reporter, tracker


def main(argv: list[str]) -> int:
    from k5cli.train_run import load_job, run_training

    if len(argv) != 2 or argv[0] != "--job":
        raise SystemExit("usage: python -m orchestration.pipes_train --job JOB.json|'{...}'")
    job = load_job(argv[1])
    if os.environ.get("RANK", "0") != "0":  # torchrun worker other than rank 0: train only
        run_training(job)
        return 0
    with open_dagster_pipes() as pipes:
        result, reporter, tracker = run_reported(pipes, Path(job.checkpoint.out),
                                                 lambda callbacks: run_training(job, callbacks=callbacks))
        meta = {**reporter.summary(), "stage": result["stage"], "step": result["step"],
                "world_size": result["world_size"], "resumed_from": result["resumed_from"] or 0,
                # damaged checkpoints the resume passed over, newest first ("" when none)
                "skipped_checkpoints": "; ".join(f"{c['checkpoint']}: {c['reason']}"
                                                 for c in result.get("skipped_checkpoints", []))}
        if tracker is not None:
            meta.update(mlflow_run_id=tracker.run_id, samples_logged=len(tracker.logged_samples))
        pipes.report_asset_materialization(metadata=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""MLflow logging helpers over the fluent MLflow API: live logging from inside a training job (rank 0), and the demo
generation run's tracker.

The Dagster asset creates the stage's run and hands its id to the job in ``K5_MLFLOW_RUN_ID`` (tracking URI in
``MLFLOW_TRACKING_URI``); the job resumes that run with system metrics on, logs every step's numeric metrics, the
sample folders the ``SampleGenerator`` writes (``samples/step_<N>``) and, at the end, the exported EMA checkpoint.
Kept in ``orchestration`` so ``k5model`` never imports MLflow.

``MLflowGenerationTracker`` is the ``evaluation.demo_generation.GenerationTracker`` of the ``demo_generation`` asset:
params, per-clip media and timings, totals, preview and a JSON record, in the run the asset started.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestration.settings import offline_env

RUN_ID_ENV = "K5_MLFLOW_RUN_ID"


class MLflowStepLogger:
    """Trainer callback: ``mlflow.log_metrics`` each step (loss, grad_norm, lr, tokens_per_s, model_tflops,
    step_time_s, peak_mem_gib, ...), sample media as artifacts under ``samples/step_<N>``."""

    def __init__(self, run_id: str, out_dir: str | Path, *, tracking_uri: str | None = None,
                 system_metrics: bool = True):
        offline_env()
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.mlflow = mlflow
        self.out_dir = Path(out_dir)
        self.run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        self.run_id = run_id
        self.logged_samples: list[int] = []

    @classmethod
    def from_env(cls, out_dir: str | Path, environ: Mapping[str, str] | None = None) -> MLflowStepLogger | None:
        """The logger of the run named by ``K5_MLFLOW_RUN_ID``, or None when the job was started without one."""
        env = os.environ if environ is None else environ
        run_id = env.get(RUN_ID_ENV)
        return cls(run_id, out_dir, tracking_uri=env.get("MLFLOW_TRACKING_URI")) if run_id else None

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}
        self.mlflow.log_metrics(values, step=step)
        samples = self.out_dir / "samples" / f"step_{step}"
        if samples.is_dir():
            self.mlflow.log_artifacts(str(samples), f"samples/step_{step}")
            self.logged_samples.append(step)

    def finish(self, *, failed: bool = False) -> None:
        """Log the exported EMA checkpoint (``OUT/ema``: ``transformer/`` folder and the official single file) and
        end the run (FINISHED, or FAILED when the job raised)."""
        if not failed:
            ema = self.out_dir / "ema"
            if (ema / "transformer").is_dir():
                self.mlflow.log_artifacts(str(ema / "transformer"), "transformer")
            for single in sorted(ema.glob("*.safetensors")):
                self.mlflow.log_artifact(str(single), "checkpoint")
            # the checkpoint tag is set by the stage asset once the run folder is published (never a .partial path)
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class MLflowGenerationTracker:
    """Logs a generation run into the active MLflow run (``MLflowResource.start_run``): params at the start, each
    clip's mp4 under ``media/`` with its timings as metrics at step = clip index, then totals, ``preview.png`` and
    ``generation.json``."""

    def __init__(self) -> None:
        import mlflow

        self.mlflow = mlflow

    def start(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params(params)

    def clip(self, index: int, media: Path, metrics: dict[str, float]) -> None:
        self.mlflow.log_artifact(str(media), artifact_path="media")
        self.mlflow.log_metrics(metrics, step=index)

    def finish(self, metrics: dict[str, float], preview: Path, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics(metrics)
        self.mlflow.log_artifact(str(preview))
        self.mlflow.log_dict(record, "generation.json")

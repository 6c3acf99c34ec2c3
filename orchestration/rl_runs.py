"""How the RL post-training assets run (report §6.6): the two training jobs (relative reward model, DRaFT-K) launched
through Dagster Pipes the way the training stages are (a subprocess, or a GPU pod from ``TrainingJobResource``'s pod
settings), each with an MLflow run under the ``rl`` lineage run. The assets' Config classes are generated from the
library specs (``orchestration.config_specs``); the reward pairs themselves are library code (``k5data.reward_pairs``).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dagster as dg

from k5model.rl.jobs import DraftTrainJob, RewardTrainJob
from orchestration.stage_runs import hold_stage, publish, work_dir

RL_CHAIN = "rl"  # MLflow lineage run the reward and RL runs nest under
KINDS = {"reward": RewardTrainJob, "draft": DraftTrainJob}


def rl_command(kind: str, job: RewardTrainJob | DraftTrainJob, python: str = sys.executable) -> list[str]:
    """The job-side command (``orchestration.pipes_rl``), the RL counterpart of ``training_jobs.training_command``."""
    if kind not in KINDS:
        raise ValueError(f"RL job kind {kind!r} is not one of {sorted(KINDS)}")
    return [python, "-m", "orchestration.pipes_rl", "--kind", kind, "--job", job.to_json()]


def run_rl_job(context: dg.AssetExecutionContext, training_job: Any, kind: str, job: RewardTrainJob | DraftTrainJob,
               env: Mapping[str, str]) -> dict[str, Any]:
    """Run one RL job through Pipes on the training resource's backend (a subprocess, or one pod with one GPU:
    image_lite DRaFT-K and the 7B reward model fit one H200, docs/rl.md); returns the job's reported metadata."""
    command = functools.partial(rl_command, kind)
    done = training_job.run_command(context, command, job, env, gpus=1, label="k5-rl")
    reported = done.get_materialize_result().metadata
    return {k: getattr(v, "value", v) for k, v in reported.items()}


def run_tracked(context: dg.AssetExecutionContext, mlflow: Any, training_job: Any, kind: str,
                job: RewardTrainJob | DraftTrainJob, final: Path, tags: dict[str, str],
                finish: Callable[[Path], None] | None = None) -> tuple[dict[str, Any], str]:
    """The job (writing into ``job.out``, which must be ``stage_runs.work_dir(final)``) under its MLflow run (params =
    the job spec; metrics logged live by the job), then ``finish(work)`` (e.g. a pipeline export), then the folder
    published as ``final`` - all under the asset's one-writer lease: (summary, run link)."""
    import shutil

    work = Path(job.out)
    if work != work_dir(final):
        raise ValueError(f"an RL job must write into {work_dir(final)} (stage_runs.work_dir), not {work}")
    asset = context.asset_key.to_user_string()
    with hold_stage(final, f"Dagster run {context.run_id}", asset=asset) as lease:
        shutil.rmtree(work, ignore_errors=True)  # RL jobs do not resume: each attempt starts afresh
        params = {f"job.{k}": v for k, v in asdict(job).items()}
        run_id = mlflow.start_stage_run(RL_CHAIN, f"{RL_CHAIN}/{final.name}", context.run_id, params,
                                        {"dagster_asset": asset, **tags})
        env = {"MLFLOW_TRACKING_URI": mlflow.resolved_tracking_uri(), "K5_MLFLOW_RUN_ID": run_id}
        try:
            run_rl_job(context, training_job, kind, job, env)
            if finish is not None:
                finish(work)
        except BaseException:
            mlflow.end_stage_run(run_id, failed=True)
            raise
        lease.check()
        publish(work, final, rewrite=("summary.json",))
    summary = json.loads((final / "summary.json").read_text())
    url = mlflow.end_stage_run(run_id, tags={f"k5_{k}": str(v)[:5000] for k, v in summary.items()
                                             if k.startswith(("selected", "heldout"))})
    return {**summary, "mlflow_run_id": run_id}, url


def export_rl_pipeline(out: Path, policy_pipeline: str | Path) -> Path:
    """The RL policy as a complete pipeline folder (the stages' export: trained transformer + the base's frozen
    parts linked)."""
    from k5model.checkpoint import assemble_pipeline_folder

    return assemble_pipeline_folder(policy_pipeline, out / "transformer", out / "pipeline")


def tiny_reward_base(paths: Any, pipeline: str) -> Path:
    """The demo's reward model start: a tiny random Qwen2.5-VL built once under ``models/tiny_reward`` from the
    pipeline's tokenizer (same class and ``from_pretrained`` path as the 7B)."""
    from k5model.rl.reward import build_tiny_reward_model

    return build_tiny_reward_model(paths.models / "tiny_reward", tokenizer_dir=Path(pipeline) / "tokenizer")

"""Distilled models (report §6.5, §7.2) as Dagster assets (group ``distillation``), after the Flash teacher stage:

``train_video_lite_mr_10s`` → ``cfg_distilled`` (50 NFE, guidance 1) → ``tscd_16nfe`` (16 NFE on saved segment
boundaries) → ``flash`` (adversarial post-training); ``magcache_calibration`` (per-branch ratios of the teacher at
one sampling setting). Each runs as a GPU job through the stages' Pipes path (``orchestration.distill_runs``: one
typed ``TrainJob``, ``TrainingJobResource``, a ``.partial`` work folder published only when complete, one MLflow run),
exports a complete pipeline folder whose ``sampling_config.json`` carries its sampling settings, and records its
latent MSE to the teacher's 100-NFE guided reference. ``flash`` then goes through SBS ``flash_vs_<teacher>`` and the
release gate (``release`` with ``distilled: flash``).
"""

import dagster as dg

from evaluation.sbs.comparisons import FLASH_TEACHER_STAGE
from orchestration.distill_runs import DistillInputs, run_distill
from orchestration.lineage import latest_metadata
from orchestration.resources import K5HomeResource, MLflowResource, TrainingJobResource

BASE_STAGE = f"train_{FLASH_TEACHER_STAGE}"  # the last Video Lite stage of Table 4 (the SFT soup once it is released)


class DistillConfig(dg.Config):
    train_steps: int = 10  # demo scale; production runs thousands of steps on GPUs
    lr: float = 1e-3  # cfg_distilled / tscd (flash keeps the report's RMSprop rates)
    reference_steps: int = 100  # NFE per branch of the guided reference (and of the MagCache calibration)
    train_seeds: int = 2  # teacher samples per prompt in the distillation set
    latent_frames: int = 2  # latent grid T x 16 x 16 (whole NABLA tiles)


def _asset(name: str, upstream: str, description: str) -> dg.AssetsDefinition:
    @dg.asset(name=name, group_name="distillation", kinds={"pytorch", "mlflow"}, deps=sorted({BASE_STAGE, upstream}),
              owners=["team:k5-lifecycle"], pool="gpu", description=description)
    def _distill(context: dg.AssetExecutionContext, config: DistillConfig, k5_home: K5HomeResource,
                 mlflow: MLflowResource, training_job: TrainingJobResource) -> dg.MaterializeResult:
        inputs = DistillInputs(
            asset=name, teacher_pipeline=str(latest_metadata(context, BASE_STAGE)["pipeline_dir"]),
            upstream_pipeline=str(latest_metadata(context, upstream)["pipeline_dir"]), teacher_stage=BASE_STAGE,
            train_steps=config.train_steps, lr=config.lr, reference_steps=config.reference_steps,
            train_seeds=config.train_seeds, latent_frames=config.latent_frames)
        return dg.MaterializeResult(metadata=run_distill(context, inputs, k5_home.paths, mlflow, training_job))

    return _distill


cfg_distilled = _asset("cfg_distilled", BASE_STAGE,
                       "CFG distillation (w=5.0, null prompt): the student samples in 50 NFE with guidance 1.")
tscd_16nfe = _asset("tscd_16nfe", "cfg_distilled",
                    "TSCD of the CFG-distilled model to 16 NFE; segment boundaries saved in sampling_config.json.")
flash = _asset("flash", "tscd_16nfe",
               "Adversarial post-training of the 16-NFE model (hinge, RMSprop 1e-6/1e-4, re-noised D inputs).")
magcache_calibration = _asset("magcache_calibration", BASE_STAGE,
                              "MagCache per-branch magnitude ratios of the teacher at one sampling setting; "
                              "exported with its cached-inference settings.")
distill_assets = [cfg_distilled, tscd_16nfe, flash, magcache_calibration]

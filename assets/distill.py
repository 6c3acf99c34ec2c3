"""Distilled models (report §6.5, §7.2) as Dagster assets (group ``distillation``), after the last Video Lite stage:

``train_video_lite_mr_10s`` → ``cfg_distilled`` (50 NFE, guidance 1) → ``tscd_16nfe`` (16 NFE on saved segment
boundaries) → ``flash`` (adversarial post-training); ``magcache_calibration`` (per-branch ratios of the base model at
one sampling setting). Each exports a complete pipeline folder whose ``sampling_config.json`` carries its sampling
settings, records its latent MSE to the base model's 100-NFE guided reference, and logs an MLflow run. The work runs in
the asset's process (``k5model.distill.export``); demo-scale defaults.
"""

import dagster as dg

from k5model.distill.export import DistillStageSpec, run_distill_stage
from orchestration.lineage import latest_metadata
from orchestration.resources import K5HomeResource, MLflowResource

BASE_STAGE = "train_video_lite_mr_10s"  # the last Video Lite stage of Table 4 (the SFT soup once it is released)


class DistillConfig(dg.Config):
    train_steps: int = 10  # demo scale; production runs thousands of steps on GPUs
    lr: float = 1e-3  # cfg_distilled / tscd (flash keeps the report's RMSprop rates)
    reference_steps: int = 100  # NFE per branch of the guided reference (and of the MagCache calibration)
    train_seeds: int = 2  # teacher samples per prompt in the distillation set
    latent_frames: int = 2  # latent grid T x 16 x 16 (whole NABLA tiles)


def run_stage_asset(context: dg.AssetExecutionContext, kind: str, upstream: str, config: DistillConfig,
                    k5_home: K5HomeResource, mlflow_res: MLflowResource) -> dg.MaterializeResult:
    """Shared body: resolve the folders from the lineage, run the stage under an MLflow run, report metadata."""
    import mlflow

    spec = DistillStageSpec(kind=kind, train_steps=config.train_steps, lr=config.lr,
                            reference_steps=config.reference_steps, train_seeds=config.train_seeds,
                            latent_grid=(config.latent_frames, 16, 16))
    base_dir = latest_metadata(context, BASE_STAGE)["pipeline_dir"]
    upstream_dir = latest_metadata(context, upstream)["pipeline_dir"]
    out = k5_home.paths.models / "distill" / context.asset_key.to_user_string() / "pipeline"
    with mlflow_res.start_run(f"distill_{kind}", tags={"dagster_run_id": context.run_id, "k5_kind": kind}) as run:
        mlflow.log_params({"kind": kind, "base_dir": base_dir, "upstream_dir": upstream_dir, "nfe": spec.nfe,
                           "train_steps": spec.train_steps, "lr": spec.lr})
        result = run_distill_stage(spec, base_dir=base_dir, upstream_dir=upstream_dir, out_dir=out,
                                   on_step=lambda step, m: mlflow.log_metrics(m, step=step))
        figures = {k: float(v) for k, v in result.items() if k.endswith("_mse") or k.endswith("per_sample")}
        mlflow.log_metrics(figures)
    sampling = result["sampling"]
    return dg.MaterializeResult(metadata={
        "pipeline_dir": str(out), "path": str(out), "nfe": sampling["num_steps"],
        "guidance_scale": sampling["guidance_scale"], "sampling": dg.MetadataValue.json(sampling), **figures,
        "mlflow_run": dg.MetadataValue.url(mlflow_res.run_url(run))})


def _asset(name: str, kind: str, upstream: str, description: str) -> dg.AssetsDefinition:
    @dg.asset(name=name, group_name="distillation", kinds={"pytorch", "mlflow"}, deps=sorted({BASE_STAGE, upstream}),
              owners=["team:k5-lifecycle"], pool="gpu", description=description)
    def _distill(context: dg.AssetExecutionContext, config: DistillConfig, k5_home: K5HomeResource,
                 mlflow: MLflowResource) -> dg.MaterializeResult:
        return run_stage_asset(context, kind, upstream, config, k5_home, mlflow)

    return _distill


cfg_distilled = _asset("cfg_distilled", "cfg_distilled", BASE_STAGE,
                       "CFG distillation (w=5.0, null prompt): the student samples in 50 NFE with guidance 1.")
tscd_16nfe = _asset("tscd_16nfe", "tscd", "cfg_distilled",
                    "TSCD of the CFG-distilled model to 16 NFE; segment boundaries saved in sampling_config.json.")
flash = _asset("flash", "flash", "tscd_16nfe",
               "Adversarial post-training of the 16-NFE model (hinge, RMSprop 1e-6/1e-4, re-noised D inputs).")
magcache_calibration = _asset("magcache_calibration", "magcache_calibration", BASE_STAGE,
                              "MagCache per-branch magnitude ratios of the base model at one sampling setting; "
                              "exported with its cached-inference settings.")

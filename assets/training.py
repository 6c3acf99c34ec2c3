"""Pre-training stages of report Table 4 as Dagster assets (group ``training``), one factory for the family.

Each stage depends on its parent stage (Figure 18 chain), on the curated latent shards it trains on, and on the base
pipeline whose frozen parts its export links; it runs as an external job through Dagster Pipes
(``TrainingJobResource``: a local subprocess, or a Kubernetes GPU pod with ``K5_PIPES=k8s``) from one ``TrainJob``.
A failed or killed attempt keeps its work folder, so a retry (``RetryPolicy``) or a manual re-materialization resumes
from the last sharded checkpoint; only a completed job replaces the stage's last good export
(``orchestration.stage_runs``).
"""

import math

import dagster as dg

from k5model.training.stages import CHAINS, get_table_stage
from orchestration.lineage import latest_metadata, stage_dir, upstream_path
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource, TrainingJobResource
from orchestration.stage_runs import (
    TREND_MIN_STEPS,
    StageInputs,
    loss_problems,
    parent_init,
    read_metrics,
    run_stage,
)


class StageRunConfig(dg.Config):
    steps: int = 3  # demo scale; production stages run their Table 4 step count on GPUs
    lr: float | None = None  # peak learning rate instead of the Table 4 stage's (unset: the stage's)
    demo: bool = True
    init_from: str | None = None  # a released checkpoint (diffusers folder / official file) instead of the parent
    ckpt_every: int = 1  # sharded checkpoint every N steps: what a retry resumes from (production: hundreds)
    nproc: int | None = None  # processes (GPUs) of the job; unset: the training_job resource's default
    replicate: int = 1  # HSDP replica groups (1 = plain FSDP over all ranks of the job)
    offload_activations: bool = False  # checkpointed blocks keep their inputs in pinned host memory
    # Sample generations from fixed validation prompts with the EMA weights: every N steps and at the last step
    # (0 = last step only, None = never), through the base pipeline's text encoders and VAE.
    sample_every: int | None = 0
    sample_steps: int = 2
    validation_prompts: int = 2  # first N MovieGen (video stages) or PartiPrompts (image stages) prompts
    system_metrics_interval_s: float = 1.0  # MLflow system metrics sampling (demo stages last seconds)


IMAGE_PRESETS = ("image_lite", "image_lite_edit")


def base_bundle(stage: str) -> str:
    """The asset whose pipeline folder a stage trains and exports with: image stages (editing too) the T2I bundle."""
    return "tiny_image_bundle" if get_table_stage(stage).preset in IMAGE_PRESETS else "tiny_model_bundle"


def latent_set(stage: str) -> str:
    """The latent shards a stage trains on: Image Lite in its image VAE's latent space, the Image Editing stages on
    the mined editing pairs (same latent space), video models in theirs."""
    preset = get_table_stage(stage).preset
    if preset == "image_lite_edit":
        return "edit_latent_shards"
    return "image_latent_shards" if preset == "image_lite" else "latent_shards"


def write_validation_prompts(k5_home: K5HomeResource, stage: str, limit: int) -> str:
    """The fixed validation prompts of a stage (MovieGen for video stages, PartiPrompts for image-only ones)."""
    from evaluation.prompts import load_moviegen, load_parti

    video = bool({"t2v", "i2v"} & set(get_table_stage(stage).tasks))  # t2i and editing stages: PartiPrompts
    records = load_moviegen(limit=limit) if video else load_parti(limit=limit)
    path = k5_home.paths.home / "cache" / "validation_prompts" / f"{stage}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(r.prompt.split()) for r in records) + "\n")
    return str(path)


def build_stage_asset(chain: str, stage: str, parent: str | None) -> dg.AssetsDefinition:
    table = get_table_stage(stage)

    @dg.asset(name=f"train_{stage}", group_name="training", kinds={"pytorch", "mlflow"},
              deps=[*([f"train_{parent}"] if parent else []), latent_set(stage), base_bundle(stage)],
              retry_policy=dg.RetryPolicy(max_retries=1), owners=["team:k5-lifecycle"],
              pool="gpu",  # one slot per concurrent GPU stage job; the limit lives in the instance (infra/dagster.yaml)
              description=f"{table.row}: {table.steps:,} steps at batch {table.batch} in production (report Table 4)"
              "; demo scale by default. Trains on the curated latent shards of its resolution classes and exports a "
              "complete pipeline folder; retries resume from the last checkpoint.")
    def _stage(context: dg.AssetExecutionContext, config: StageRunConfig, k5_home: K5HomeResource,
               mlflow: MLflowResource, object_store: ObjectStoreResource,
               training_job: TrainingJobResource) -> dg.MaterializeResult:
        sampling = config.sample_every is not None
        inputs = StageInputs(
            stage=stage, chain=chain, steps=config.steps, lr=config.lr, demo=config.demo, ckpt_every=config.ckpt_every,
            init=parent_init(context, parent, config.init_from),
            base_pipeline=str(upstream_path(context, base_bundle(stage))),
            shard_meta=latest_metadata(context, latent_set(stage)), store_uri=object_store.store().uri(""),
            nproc=config.nproc or training_job.default_nproc(), replicate=config.replicate,
            offload_activations=config.offload_activations, sample_every=config.sample_every,
            sample_steps=config.sample_steps,
            prompts_file=write_validation_prompts(k5_home, stage, config.validation_prompts) if sampling else None,
            sample_cache=str(k5_home.paths.home / "cache" / "sample_text"))
        meta = run_stage(context, inputs, k5_home.paths, mlflow, training_job, config.system_metrics_interval_s)
        return dg.MaterializeResult(metadata=meta)

    return _stage


def build_stage_checks(stage: str) -> list[dg.AssetChecksDefinition]:
    key = dg.AssetKey(f"train_{stage}")

    @dg.asset_check(asset=key, name="loss_finite_and_decreasing",
                    description="Every step's loss is finite and, over 12 steps or more, the last quarter's mean loss "
                    "is not above the first quarter's (demo stages are too short for a trend).")
    def _loss(k5_home: K5HomeResource) -> dg.AssetCheckResult:
        losses = [m["loss"] for m in read_metrics(stage_dir(k5_home.paths, stage) / "metrics.jsonl")]
        problems = loss_problems(losses)
        return dg.AssetCheckResult(passed=not problems, description="; ".join(problems) or None, metadata={
            "first_loss": losses[0] if losses else math.nan, "last_loss": losses[-1] if losses else math.nan,
            "steps": len(losses), "trend_checked": len(losses) >= TREND_MIN_STEPS})

    @dg.asset_check(asset=key, name="pipeline_loads",
                    description="The exported pipeline folder is complete: model_index.json, every component, and a "
                    "transformer that loads into CrossDiT.")
    def _pipeline(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        from k5model.crossdit import CrossDiT
        from k5model.pipeline import inspect_model_dir

        folder = str(latest_metadata(context, key)["pipeline_dir"])
        try:
            info = inspect_model_dir(folder)
            params = CrossDiT.from_pretrained(folder).num_parameters()
        except Exception as err:  # the check reports what is wrong instead of crashing the run
            return dg.AssetCheckResult(passed=False, metadata={"error": str(err)[:500], "folder": folder})
        return dg.AssetCheckResult(passed=True, metadata={"parameters": params, "folder": folder,
                                                          "task": str(info["task"]), "vae": str(info["vae_class"])})

    return [_loss, _pipeline]


stage_assets = []
stage_checks = []
for _chain, _stages in CHAINS.items():
    for _stage in _stages:
        stage_assets.append(build_stage_asset(_chain, _stage, get_table_stage(_stage).parent))
        stage_checks.extend(build_stage_checks(_stage))

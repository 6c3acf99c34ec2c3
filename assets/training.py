"""Pre-training stages of report Table 4 as Dagster assets (group ``training``).

Each stage is one asset that depends on its parent stage (Figure 18 chain) and runs as an external job through
Dagster Pipes (``orchestration.training_jobs.TrainingJobResource``): a local subprocess by default, a Kubernetes GPU
pod with ``K5_PIPES=k8s``. Before launching, the asset creates the stage's MLflow run (nested under a lineage run of
the Dagster run) and passes its id to the job, which logs step metrics, system metrics, sample generations and the
exported checkpoint into it live; the job also streams step metrics back through Pipes. ``make demo`` materializes
every chain at demo scale (tiny preset, a few steps, CPU).
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import dagster as dg

from assets.models import TINY_KIND, TINY_SEED, tiny_model_dir
from k5model.training.stages import CHAINS, demo_scaling, get_table_stage
from orchestration.resources import K5HomeResource, MLflowResource
from orchestration.training_jobs import TrainingJobResource


class StageRunConfig(dg.Config):
    steps: int = 3  # demo scale; production stages run their Table 4 step count on GPUs
    demo: bool = True
    init_from: str | None = None  # a released checkpoint (diffusers folder / official file) instead of the parent
    replicate: int = 1  # HSDP replica groups (1 = plain FSDP over all ranks of the job)
    offload_activations: bool = False  # checkpointed blocks keep their inputs in pinned host memory
    # Sample generations from fixed validation prompts with the EMA weights: every N steps and at the last step
    # (0 = last step only, None = never), through the text encoders and VAE of ``sample_pipeline`` (demo default: the
    # tiny pipeline folder of ``tiny_model_bundle``).
    sample_every: int | None = 0
    sample_pipeline: str | None = None
    sample_steps: int = 2
    validation_prompts: int = 2  # first N MovieGen (video stages) or PartiPrompts (image stages) prompts
    system_metrics_interval_s: float = 1.0  # MLflow system metrics sampling (demo stages last seconds)


def stage_dir(home: K5HomeResource, stage: str) -> Path:
    return home.paths.models / "training" / stage


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def validation_prompts(video: bool, limit: int) -> list[str]:
    """The fixed validation prompts of a stage: the first ``limit`` MovieGen prompts for video stages, PartiPrompts
    for image-only ones (one line each)."""
    from evaluation.prompts import load_moviegen, load_parti

    records = load_moviegen(limit=limit) if video else load_parti(limit=limit)
    return [" ".join(r.prompt.split()) for r in records]


def stage_params(stage: str, parent: str | None, init: str | None, config: StageRunConfig) -> dict:
    """MLflow params of a stage run: the stage config that trains (demo scaling or the Table 4 row) and the launch."""
    table = get_table_stage(stage)
    trained = dataclasses.asdict(demo_scaling(stage, steps=config.steps)) if config.demo else dataclasses.asdict(table)
    return {**{f"stage.{k}": v for k, v in trained.items()}, "stage": stage, "parent": parent or "",
            "init": init or "random", "demo": config.demo, "steps": config.steps, "replicate": config.replicate,
            "offload_activations": config.offload_activations, "sample_every": config.sample_every,
            "table4_row": table.row}


def _job_args(stage: str, work: Path, init: str | None, config: StageRunConfig, k5_home: K5HomeResource) -> list[str]:
    args = ["--stage", stage, "--out", str(work), "--steps", str(config.steps), "--ckpt-every",
            str(max(config.steps, 1))]
    if config.demo:
        args.append("--demo")
    if init:
        args += ["--init", init]
    if config.replicate != 1:
        args += ["--replicate", str(config.replicate)]
    if config.offload_activations:
        args.append("--offload-activations")
    if config.sample_every is not None:
        pipeline = config.sample_pipeline
        if pipeline is None:
            if not config.demo:
                raise dg.Failure(f"{stage}: set sample_pipeline (a pipeline folder with the stage's text encoders and "
                                 "VAE) or sample_every=None to train without sample generations")
            from k5model.tiny import build_tiny_pipeline

            # the tiny_model_bundle folder (built by that asset; built here if this stage runs on its own)
            pipeline = str(build_tiny_pipeline(tiny_model_dir(k5_home), kind=TINY_KIND, seed=TINY_SEED))
        video = set(get_table_stage(stage).tasks) != {"t2i"}
        prompts = work / "validation_prompts.txt"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("\n".join(validation_prompts(video, config.validation_prompts)) + "\n")
        args += ["--sample-every", str(config.sample_every), "--sample-pipeline", pipeline,
                 "--sample-prompts", str(prompts), "--sample-steps", str(config.sample_steps),
                 "--sample-cache", str(k5_home.paths.home / "cache" / "sample_text")]
    return args


def build_stage_asset(chain: str, stage: str, parent: str | None) -> dg.AssetsDefinition:
    table = get_table_stage(stage)

    @dg.asset(
        name=f"train_{stage}",
        group_name="training",
        deps=[*([f"train_{parent}"] if parent else []), "tiny_model_bundle"],
        kinds={"pytorch", "mlflow"},
        description=f"{table.row}: {table.steps:,} steps at batch {table.batch} in production (report Table 4); "
        "demo scale by default.",
    )
    def _stage(context: dg.AssetExecutionContext, config: StageRunConfig, k5_home: K5HomeResource,
               mlflow: MLflowResource, training_job: TrainingJobResource) -> dg.MaterializeResult:
        out = stage_dir(k5_home, stage)
        work = out.with_name(f".{stage}.partial")  # a failed run never replaces the last good stage
        shutil.rmtree(work, ignore_errors=True)
        init = config.init_from or (str(stage_dir(k5_home, parent) / "ema" / "transformer") if parent else None)
        if init and not Path(init).exists():
            raise dg.Failure(f"{stage}: starting weights {init} do not exist (materialize train_{parent} first)")
        args = _job_args(stage, work, init, config, k5_home)
        run_id = mlflow.start_stage_run(chain, stage, context.run_id, stage_params(stage, parent, init, config))
        env = {"MLFLOW_TRACKING_URI": mlflow.resolved_tracking_uri(), "K5_MLFLOW_RUN_ID": run_id,
               "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": str(config.system_metrics_interval_s)}
        try:
            reported = training_job.run(context, args, env).get_materialize_result()
        except BaseException:
            mlflow.end_stage_run(run_id, failed=True)  # the run keeps every step the job logged before failing
            raise
        url = mlflow.end_stage_run(run_id)
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
        metrics = read_metrics(out / "metrics.jsonl")
        meta = dict(reported.metadata or {})
        meta.update({"mlflow_run": dg.MetadataValue.url(url), "mlflow_run_id": run_id,
                     "checkpoint_uri": (out / "ema" / "transformer").as_uri(),
                     "final_loss": metrics[-1]["loss"] if metrics else math.nan, "steps": len(metrics)})
        return dg.MaterializeResult(metadata=meta)

    return _stage


def build_stage_checks(stage: str) -> list[dg.AssetChecksDefinition]:
    key = dg.AssetKey(f"train_{stage}")

    @dg.asset_check(asset=key, name="loss_finite_and_decreasing")
    def _loss(k5_home: K5HomeResource) -> dg.AssetCheckResult:
        losses = [m["loss"] for m in read_metrics(stage_dir(k5_home, stage) / "metrics.jsonl")]
        finite = bool(losses) and all(math.isfinite(x) for x in losses)
        # demo stages run a handful of noisy steps: compare the last step with the first
        decreasing = finite and losses[-1] <= losses[0]
        return dg.AssetCheckResult(passed=finite and decreasing,
                                   metadata={"first_loss": losses[0] if losses else math.nan,
                                             "last_loss": losses[-1] if losses else math.nan, "finite": finite})

    @dg.asset_check(asset=key, name="checkpoint_loads_and_exports")
    def _ckpt(k5_home: K5HomeResource) -> dg.AssetCheckResult:
        from k5model.crossdit import CrossDiT

        folder = stage_dir(k5_home, stage) / "ema" / "transformer"
        try:
            model = CrossDiT.from_pretrained(folder)
        except Exception as err:  # the check reports what is wrong instead of crashing the run
            return dg.AssetCheckResult(passed=False, metadata={"error": str(err)[:500]})
        return dg.AssetCheckResult(passed=True, metadata={"parameters": model.num_parameters(),
                                                          "folder": str(folder)})

    return [_loss, _ckpt]


# Video Lite chain materialized by the demo; the Image Lite and Video Pro chains are defined the same way.
stage_assets = []
stage_checks = []
for _chain, _stages in CHAINS.items():
    for _i, _stage in enumerate(_stages):
        _parent = get_table_stage(_stage).parent
        stage_assets.append(build_stage_asset(_chain, _stage, _parent))
        stage_checks.extend(build_stage_checks(_stage))

"""Pre-training stages of report Table 4 as Dagster assets (group ``training``).

Each stage is one asset that depends on its parent stage (Figure 18 chain) and runs as an external job through
Dagster Pipes: a local subprocess by default (``orchestration.pipes_train``, the same trainer as ``k5``), a Kubernetes
GPU job in production (swap the ``pipes_client`` resource). The job streams step metrics back through Pipes; this
process then logs the stage to MLflow (one run per stage, nested under a lineage run of the Dagster run) and checks
the result. ``make demo`` materializes the Video Lite chain at demo scale (tiny preset, a few steps, CPU).
"""

import json
import math
import shutil
import sys
import time
from pathlib import Path

import dagster as dg

from k5model.training.stages import CHAINS, demo_scaling, get_table_stage
from orchestration.resources import K5HomeResource, MLflowResource


class StageRunConfig(dg.Config):
    steps: int = 3  # demo scale; production stages run their Table 4 step count on GPUs
    demo: bool = True
    init_from: str | None = None  # a released checkpoint (diffusers folder / official file) instead of the parent


def stage_dir(home: K5HomeResource, stage: str) -> Path:
    return home.paths.models / "training" / stage


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _lineage_run(client, experiment_id: str, chain: str, dagster_run_id: str) -> str:
    """One MLflow parent run per chain and Dagster run; every stage run of that Dagster run nests under it."""
    found = client.search_runs([experiment_id], filter_string=f"tags.k5_lineage = '{chain}' and "
                               f"tags.dagster_run_id = '{dagster_run_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{chain} lineage",
                            tags={"k5_lineage": chain, "dagster_run_id": dagster_run_id})
    return run.info.run_id


def _log_to_mlflow(mlflow: MLflowResource, chain: str, stage: str, dagster_run_id: str, params: dict,
                   metrics: list[dict], export: Path) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow.resolved_tracking_uri())
    exp = mlflow.experiment_id()
    parent = _lineage_run(client, exp, chain, dagster_run_id)
    run = client.create_run(exp, run_name=stage, tags={"mlflow.parentRunId": parent, "k5_stage": stage,
                                                       "dagster_run_id": dagster_run_id})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id,
                     params=[Param(k, str(v)[:500]) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now, int(m["step"])) for m in metrics for k, v in m.items()
                              if k != "step" and isinstance(v, int | float)])
    if export.is_dir():
        client.log_artifacts(run.info.run_id, str(export), "transformer")
    client.set_terminated(run.info.run_id)
    return mlflow.run_url(client.get_run(run.info.run_id))


def build_stage_asset(chain: str, stage: str, parent: str | None) -> dg.AssetsDefinition:
    table = get_table_stage(stage)

    @dg.asset(
        name=f"train_{stage}",
        group_name="training",
        deps=[f"train_{parent}"] if parent else [],
        kinds={"pytorch", "mlflow"},
        description=f"{table.row}: {table.steps:,} steps at batch {table.batch} in production (report Table 4); "
        "demo scale by default.",
    )
    def _stage(context: dg.AssetExecutionContext, config: StageRunConfig, k5_home: K5HomeResource,
               mlflow: MLflowResource, pipes_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
        out = stage_dir(k5_home, stage)
        work = out.with_name(f".{stage}.partial")  # a failed run never replaces the last good stage
        shutil.rmtree(work, ignore_errors=True)
        cmd = [sys.executable, "-m", "orchestration.pipes_train", "--stage", stage, "--out", str(work),
               "--steps", str(config.steps), "--ckpt-every", str(max(config.steps, 1))]
        if config.demo:
            cmd.append("--demo")
        init = config.init_from or (str(stage_dir(k5_home, parent) / "ema" / "transformer") if parent else None)
        if init:
            if not Path(init).exists():
                raise dg.Failure(f"{stage}: starting weights {init} do not exist (materialize train_{parent} first)")
            cmd += ["--init", init]
        reported = pipes_client.run(context=context, command=cmd).get_materialize_result()
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
        metrics = read_metrics(out / "metrics.jsonl")
        scaled = demo_scaling(stage) if config.demo else None
        params = {"stage": stage, "parent": parent or "", "init": init or "random", "demo": config.demo,
                  "steps": config.steps, **({k: getattr(scaled, k) for k in ("lr", "weight_decay", "batch",
                                                                              "attention", "ema_decay")}
                                             if scaled else {})}
        url = _log_to_mlflow(mlflow, chain, stage, context.run_id, params, metrics, out / "ema" / "transformer")
        meta = dict(reported.metadata or {})
        meta.update({"mlflow_run": dg.MetadataValue.url(url), "checkpoint_uri": (out / "ema" / "transformer").as_uri(),
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

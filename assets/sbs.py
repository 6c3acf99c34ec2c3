"""Side-by-side evaluation assets (report §8.2), partitioned by comparison (``evaluation.sbs.comparisons``):
``sbs_batch`` (both models' generations + the annotation plan) and ``sbs_report`` (scores of the judgments store,
bars, HTML, ``summary.json``, MLflow), with their checks.

Layout under K5_HOME: ``sbs/<comparison>/{media/, plan.json, judgments.duckdb, report/}``. The annotation app
(``python -m ui.annotation_app serve --db .../judgments.duckdb --plan .../plan.json --media-root .../media``) and
``sbs_report`` read and write the same ``judgments.duckdb``.

Why one partitioned asset pair, not a factory of assets per comparison: the release gate and the jobs refer to one
``sbs_report`` key and pick the comparison by partition. Dagster cannot map an unpartitioned upstream onto some
partitions only, so ``sbs_batch`` depends on every ``train_<stage>`` some comparison uses (the graph over-approximates
per partition); each materialization records the exact stage runs and folders it compared in its metadata.
"""

# No `from __future__ import annotations`: Dagster resolves the Config classes from live annotations.
from pathlib import Path

import dagster as dg
from pydantic import Field

from evaluation.sbs.comparisons import DEMO_COMPARISON, get_comparison, offered, registry, stages_referenced
from orchestration.lineage import latest_metadata, stage_pipeline_dir
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource
from orchestration.settings import K5Paths

# Built-in comparisons plus the lab's own (e.g. a stage against a released folder), read when the code location loads.
EXTRA_COMPARISONS_FILE = K5Paths.from_env().home / "sbs" / "comparisons.json"
REGISTRY = registry(EXTRA_COMPARISONS_FILE)
sbs_partitions = dg.StaticPartitionsDefinition(offered(REGISTRY.values()))
SBS_STAGE_DEPS = [f"train_{stage}" for stage in stages_referenced(REGISTRY.values())]
if any(m.asset_key == "sft_soup" for c in REGISTRY.values() for m in c.models):
    SBS_STAGE_DEPS.append("sft_soup")  # soup_vs_pretrain, soup_vs_best_single_domain (report §6.4)
SBS_STAGE_DEPS += sorted({m.asset_key for c in REGISTRY.values() for m in c.models
                          if m.kind in ("distill", "rl")})  # flash, rl_model
# What `make demo` runs: sbs_job for DEMO_COMPARISON with this run config (simulated judgments, labelled as such).
DEMO_SBS_RUN_CONFIG = {"ops": {"sbs_report": {"config": {"simulate": True}}}}


class SbsBatchConfig(dg.Config):
    subset_size: int = Field(4, description="prompts taken from the start of the prompt set")
    annotators: list[str] = Field(default_factory=lambda: [f"annotator_{k:02d}" for k in range(1, 7)],
                                  description="annotator accounts the plan assigns pairs to")
    overlap: int = Field(5, description="distinct annotators per pair (report: 5)")
    golden_identical: int = Field(1, description="golden pairs showing the same media on both sides")
    golden_degraded: int = Field(1, description="golden pairs with one side clearly degraded")
    height: int = Field(64, description="requested height; rounded up to a size both models accept")
    width: int = Field(64, description="requested width; rounded up to a size both models accept")
    num_frames: int = Field(9, description="frames per clip (4k+1)")
    num_steps: int = Field(4, description="sampler steps")
    seed: int = Field(0, description="prompt k uses seed + k for both models")
    device: str = Field("cpu", description="torch device for generation")


class SbsReportConfig(dg.Config):
    judgments_path: str | None = Field(None, description="CSV/Parquet exported from another platform (model 1 = A); "
                                       "default: the comparison's judgments store")
    simulate: bool = Field(False, description="demo only: write simulated judgments (annotators 'simulated:*') "
                           "through the store first; labelled as simulated in the report, summary.json and MLflow")
    p_a: float = Field(0.6, description="simulated raters' preference for model A")
    n_boot: int = Field(1000, description="bootstrap resamples for the 95% intervals")


def batch_dir(home: K5HomeResource, comparison: str) -> Path:
    return home.paths.home / "sbs" / comparison


def stage_metadata(context: dg.AssetExecutionContext, stage: str) -> dict:
    """The stage asset's latest materialization metadata ({} when it has none yet)."""
    try:
        return latest_metadata(context, f"train_{stage}")
    except dg.Failure:
        return {}


def resolve_models(context: dg.AssetExecutionContext, home: K5HomeResource, comparison) -> tuple[Path, Path]:
    """Pipeline folders of both models: a stage's recorded ``pipeline_dir``, else its conventional folder."""
    from evaluation.sbs.comparisons import resolve_model

    def stage_pipeline(stage: str) -> Path:
        meta = stage_metadata(context, stage)
        return Path(str(meta["pipeline_dir"])) if "pipeline_dir" in meta else stage_pipeline_dir(home.paths, stage)

    def sft_pipeline(ref: str) -> Path:
        meta = latest_metadata(context, "sft_soup")
        return Path(str(meta[{"soup": "pipeline_dir", "pretrain": "start_pipeline"}.get(ref, f"{ref}_pipeline")]))

    def asset_pipeline(asset: str) -> Path:  # a distilled model (flash_vs_<teacher>), the RL model (rl_vs_soup)
        return Path(str(latest_metadata(context, asset)["pipeline_dir"]))

    try:
        return tuple(resolve_model(m, stage_pipeline, sft_pipeline, asset_pipeline) for m in comparison.models)
    except FileNotFoundError as exc:
        raise dg.Failure(str(exc)) from exc


def gate_refs(context: dg.AssetExecutionContext, comparison) -> tuple[str, str]:
    """Both models' lineage names for the release gate: ``sft:pretrain`` is recorded as the stage the soup started
    from (``stage:<start_stage>``, the champion it must beat), every other model as itself."""
    def ref(model) -> str:
        if str(model) == "sft:pretrain":
            return f"stage:{latest_metadata(context, 'sft_soup')['start_stage']}"
        return str(model)

    return ref(comparison.model_a), ref(comparison.model_b)


@dg.asset(
    partitions_def=sbs_partitions,
    deps=SBS_STAGE_DEPS,
    group_name="evaluation",
    kinds={"pytorch", "duckdb"},
    owners=["team:k5-lifecycle"],
    tags={"stage": "evaluation"},
    description="SBS batch of one comparison of two lineage models (partition `<A>_vs_<B>`): both models' "
                "generations on the same prompts and seeds, plus the annotation plan (overlap, per-assignment "
                "left/right, golden pairs).",
    check_specs=[dg.AssetCheckSpec("plan_overlap", asset="sbs_batch",
                                   description="Every non-golden pair is planned for `overlap` distinct annotators "
                                               "(report §8.2: 5); fails when the plan under-covers a pair.")],
)
def sbs_batch(context: dg.AssetExecutionContext, config: SbsBatchConfig, k5_home: K5HomeResource,
              object_store: ObjectStoreResource):
    from evaluation.sbs.batch import BatchSettings, build_batch, publish_batch

    comparison = get_comparison(context.partition_key, REGISTRY)
    root = batch_dir(k5_home, comparison.key)
    settings = BatchSettings(**{**config.model_dump(), "annotators": tuple(config.annotators)})
    dirs = resolve_models(context, k5_home, comparison)
    result = build_batch(comparison, dirs, root, settings, log=context.log.info, refs=gate_refs(context, comparison))
    plan_uri = publish_batch(object_store.store(), result, f"sbs/{comparison.key}")
    runs = {m.name: stage_metadata(context, m.ref).get("mlflow_run_id") for m in comparison.models if m.asset_key}
    yield dg.MaterializeResult(metadata={
        "comparison": comparison.key, "model_a": str(comparison.model_a), "model_b": str(comparison.model_b),
        "model_a_dir": dg.MetadataValue.path(str(dirs[0])), "model_b_dir": dg.MetadataValue.path(str(dirs[1])),
        "model_mlflow_runs": dg.MetadataValue.json(runs), "kind": result.kind,
        "size": f"{result.height}x{result.width}", "pairs": result.pairs, "golden_pairs": result.golden_pairs,
        "annotators": len(settings.annotators), "assignments": len(result.plan.assignments),
        "overlap": result.plan.overlap, "plan": dg.MetadataValue.path(str(result.plan_path)), "plan_uri": plan_uri,
        "media_dir": dg.MetadataValue.path(str(result.media_dir)),
        "serve": f"python -m ui.annotation_app serve --db {root / 'judgments.duckdb'} --plan {result.plan_path} "
                 f"--media-root {result.media_dir}",
    })
    yield dg.AssetCheckResult(check_name="plan_overlap", passed=not result.under_covered,
                              metadata={"under_covered": len(result.under_covered),
                                        "planned_overlap": settings.overlap})


def _interval_text(name_a: str, name_b: str, scores: dict | None) -> str:
    if not scores:
        return "no ratings"
    ci = scores.get("ci95", {})
    parts = [f"{n} {scores[m]:.3f}" + (f" [{ci[m][0]:.3f}, {ci[m][1]:.3f}]" if m in ci else "")
             for n, m in ((name_a, "model1"), (name_b, "model2"))]
    return " / ".join(parts)


@dg.asset(
    partitions_def=sbs_partitions,
    deps=[sbs_batch],
    group_name="evaluation",
    kinds={"mlflow", "duckdb"},
    owners=["team:k5-lifecycle"],
    tags={"stage": "evaluation"},
    description="SBS scores of what annotators entered in the comparison's judgments store (report §8.2 formulas), "
                "bootstrap 95% intervals, agreement, golden accuracy, stacked bars, HTML and summary.json (the "
                "release gate's input), logged to MLflow on the report run and on the compared models' runs.",
    check_specs=[dg.AssetCheckSpec("judged_overlap", asset="sbs_report",
                                   description="Every non-golden pair was judged by at least the planned overlap of "
                                               "distinct annotators; fails while judging is incomplete.")],
)
def sbs_report(context: dg.AssetExecutionContext, config: SbsReportConfig, k5_home: K5HomeResource,
               mlflow: MLflowResource):
    from mlflow.tracking import MlflowClient

    from evaluation.sbs.aggregate import ReportSettings, build_report
    from evaluation.sbs.judgments_store import StoreBusy
    from evaluation.sbs.tracking import log_sbs_report

    comparison = get_comparison(context.partition_key, REGISTRY)
    try:
        result = build_report(batch_dir(k5_home, comparison.key), ReportSettings(**config.model_dump()),
                              log=context.log.info)
    except (FileNotFoundError, StoreBusy) as exc:
        raise dg.Failure(str(exc)) from exc
    runs = {m.name: stage_metadata(context, m.ref).get("mlflow_run_id") for m in comparison.models if m.asset_key}
    tags = {"k5_comparison": comparison.key, "dagster_run_id": context.run_id, "dagster_asset": "sbs_report"}
    with mlflow.start_run(f"sbs_report/{comparison.key}", tags=tags) as run:
        log_sbs_report(MlflowClient(mlflow.resolved_tracking_uri()), run.info.run_id, run.info.experiment_id,
                       result, model_runs=runs)
        report_url = mlflow.run_url(run)
    s, overall = result.summary, result.overall()
    yield dg.MaterializeResult(metadata={
        **{g: _interval_text(s["model_a_name"], s["model_b_name"], v) for g, v in overall.items()},
        "overall": dg.MetadataValue.json(overall), "summary_path": dg.MetadataValue.path(str(result.summary_path)),
        "simulated": result.simulated, "judgments_source": result.source, "judgments": s["n_judgments"],
        "annotators": len(s["annotators"]), "pairwise_agreement": s["pairwise_agreement"],
        "krippendorff_alpha": s["krippendorff_alpha"], "invalid_rows": len(s["invalid_rows"]),
        "report_html": dg.MetadataValue.path(str(result.html_path)), "mlflow_run": dg.MetadataValue.url(report_url),
    })
    yield dg.AssetCheckResult(
        check_name="judged_overlap", passed=not result.under_covered,
        metadata={"under_covered_pairs": len(result.under_covered), "simulated": result.simulated,
                  "examples": dg.MetadataValue.json(dict(list(result.under_covered.items())[:10]))})


sbs_assets = [sbs_batch, sbs_report]
__all__ = ["DEMO_COMPARISON", "DEMO_SBS_RUN_CONFIG", "sbs_assets", "sbs_batch", "sbs_partitions", "sbs_report"]

"""Side-by-side evaluation assets (report §8.2): ``sbs_batch`` (generations + annotation plan) and ``sbs_report``
(scores, stacked bars, MLflow), both partitioned by comparison, with overlap checks.

Layout under K5_HOME: ``sbs/<comparison>/{media/, plan.json, judgments.duckdb, report/}``. The annotation app
(``python -m ui.annotation_app serve --db .../judgments.duckdb --plan .../plan.json --media-root .../media``) owns
``judgments.duckdb`` while it runs; stop it before materializing ``sbs_report`` from it.
"""

# No `from __future__ import annotations`: Dagster resolves the Config classes from live annotations.
import gc
import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource


@dataclass(frozen=True)
class Comparison:
    model_a: str  # folder name under K5_HOME/models
    model_b: str
    prompt_set: str  # "moviegen" (video) or "parti" (images)


# Demo models are tiny random pipelines built on demand; stage models must have been materialized by their assets.
TINY_DEMO = {"tiny_t2v_seed0": ("t2v", 0), "tiny_t2v_seed1": ("t2v", 1)}
COMPARISONS: dict[str, Comparison] = {
    "demo_tiny_seed0_vs_seed1": Comparison("tiny_t2v_seed0", "tiny_t2v_seed1", "moviegen"),
    "sft_soup_vs_pretrain": Comparison("sft_soup", "pretrain", "moviegen"),
}
sbs_partitions = dg.StaticPartitionsDefinition(list(COMPARISONS))


class SbsBatchConfig(dg.Config):
    subset_size: int = Field(4, description="prompts taken from the start of the prompt set")
    annotators: list[str] = Field(default_factory=lambda: [f"annotator_{k:02d}" for k in range(1, 7)])
    overlap: int = Field(5, description="distinct annotators per pair (report: 5)")
    golden_identical: int = Field(1, description="golden pairs showing the same media on both sides")
    golden_degraded: int = Field(1, description="golden pairs with one side clearly degraded")
    height: int = 64
    width: int = 64
    num_frames: int = 9
    num_steps: int = 4
    seed: int = 0
    device: str = "cpu"


class SbsReportConfig(dg.Config):
    judgments_path: str | None = Field(None, description="CSV/Parquet exported from another platform (model 1 = A)")
    simulate: bool | None = Field(None, description="write simulated judgments through the store first; "
                                  "unset: only for demo comparisons (partition name starting with 'demo_')")
    p_a: float = Field(0.6, description="simulated raters' preference for model A")
    n_boot: int = 1000


def batch_dir(home: K5HomeResource, comparison: str) -> Path:
    return home.paths.home / "sbs" / comparison


def _model_dir(home: K5HomeResource, name: str) -> Path:
    path = home.paths.models / name
    if name in TINY_DEMO:
        from k5model.tiny import build_tiny_pipeline

        kind, seed = TINY_DEMO[name]
        return build_tiny_pipeline(path, kind=kind, seed=seed)  # idempotent
    if not (path / "model_index.json").exists():
        raise dg.Failure(f"model {name!r} not found at {path}: materialize its stage asset first")
    return path


def _prompts(prompt_set: str, limit: int) -> list:
    from evaluation.prompts import load_moviegen, load_parti

    if prompt_set == "moviegen":
        return load_moviegen(limit)
    if prompt_set == "parti":
        return load_parti(limit)
    raise dg.Failure(f"unknown prompt set {prompt_set!r}")


def _generate_all(model_dir: Path, prompts: list, cfg: SbsBatchConfig, out: Path, tag: str,
                  log: dg.DagsterLogManager) -> tuple[str, dict[int, str], dict[int, object]]:
    """Generate every prompt with one model (seed = cfg.seed + index, the same for both models)."""
    import torch

    from k5model.media import save_media
    from k5model.pipeline import K5Pipeline

    pipe = K5Pipeline.from_pretrained(model_dir, device=cfg.device)
    kind = "video" if pipe.is_video else "image"
    ext = ".mp4" if pipe.is_video else ".png"
    paths: dict[int, str] = {}
    frames: dict[int, object] = {}
    for k, rec in enumerate(prompts):
        res = pipe.generate(rec.prompt, height=cfg.height, width=cfg.width,
                            num_frames=cfg.num_frames if pipe.is_video else None, num_steps=cfg.num_steps,
                            seed=cfg.seed + k, progress=False)
        rel = f"p{k:04d}_{tag}{ext}"
        save_media(res.frames if pipe.is_video else res.frames[0], out / rel)
        paths[k] = rel
        frames[k] = res.frames
        log.info(f"{tag}: generated {k + 1}/{len(prompts)}")
    del pipe  # one model in memory at a time
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return kind, paths, frames


@dg.asset(
    partitions_def=sbs_partitions,
    group_name="evaluation",
    kinds={"pytorch", "duckdb"},
    owners=["team:k5-lifecycle"],
    tags={"stage": "evaluation"},
    description="SBS batch: model A and B generations on the same prompts and seeds, plus the annotation plan "
                "(overlap, per-assignment left/right, golden pairs).",
    check_specs=[dg.AssetCheckSpec("plan_overlap", asset="sbs_batch",
                                   description="every pair is planned for `overlap` distinct annotators")],
)
def sbs_batch(context: dg.AssetExecutionContext, config: SbsBatchConfig, k5_home: K5HomeResource,
              object_store: ObjectStoreResource):
    from evaluation.sbs.sbs_plan import PlanItem, build_plan, coverage, degrade_frames, golden_specs, under_covered
    from k5model.media import save_media

    comparison = context.partition_key
    spec = COMPARISONS[comparison]
    root = batch_dir(k5_home, comparison)
    media = root / "media"
    prompts = _prompts(spec.prompt_set, config.subset_size)
    kind, paths_a, frames_a = _generate_all(_model_dir(k5_home, spec.model_a), prompts, config, media, "a", context.log)
    kind_b, paths_b, _ = _generate_all(_model_dir(k5_home, spec.model_b), prompts, config, media, "b", context.log)
    if kind != kind_b:
        raise dg.Failure(f"cannot compare a {kind} model with a {kind_b} model")
    items = [PlanItem(f"{comparison}-{rec.id}", rec.prompt, paths_a[k], paths_b[k], kind=kind, seed=config.seed + k)
             for k, rec in enumerate(prompts)]
    # Golden pairs reuse model A's generations: identical = the same file twice; degraded = a blurred, noisy copy.
    ext = ".mp4" if kind == "video" else ".png"
    specs = golden_specs(config.golden_identical, config.golden_degraded, seed=config.seed)
    for g, (gkind, better) in enumerate(specs):
        k = g % len(prompts)
        good = paths_a[k]
        if gkind == "identical":
            items.append(PlanItem(f"{comparison}-golden{g}", prompts[k].prompt, good, good, kind, "identical"))
            continue
        bad = f"golden{g}_degraded{ext}"
        worse = degrade_frames(frames_a[k], seed=config.seed + g)
        save_media(worse if kind == "video" else worse[0], media / bad)
        a, b = (good, bad) if better == "A" else (bad, good)
        items.append(PlanItem(f"{comparison}-golden{g}", prompts[k].prompt, a, b, kind, "degraded", better))
    plan = build_plan(items, config.annotators, overlap=config.overlap, seed=config.seed)
    plan.meta = {"comparison": comparison, "model_a": spec.model_a, "model_b": spec.model_b,
                 "prompt_set": spec.prompt_set, "generation": config.model_dump()}
    (root / "plan.json").write_text(plan.to_json())
    for f in sorted(media.iterdir()):
        object_store.put_file(f, f"sbs/{comparison}/media/{f.name}")
    plan_uri = object_store.put_file(root / "plan.json", f"sbs/{comparison}/plan.json")
    short = under_covered(coverage(plan), plan.overlap, plan.golden_map())
    yield dg.MaterializeResult(metadata={
        "comparison": comparison, "model_a": spec.model_a, "model_b": spec.model_b, "kind": kind,
        "pairs": len(prompts), "golden_pairs": len(specs), "annotators": len(config.annotators),
        "assignments": len(plan.assignments), "overlap": plan.overlap,
        "plan": dg.MetadataValue.path(str(root / "plan.json")), "plan_uri": plan_uri,
        "media_dir": dg.MetadataValue.path(str(media)),
        "serve": f"python -m ui.annotation_app serve --db {root / 'judgments.duckdb'} --plan {root / 'plan.json'} "
                 f"--media-root {media}",
    })
    yield dg.AssetCheckResult(check_name="plan_overlap", passed=not short,
                              metadata={"under_covered": len(short), "planned_overlap": plan.overlap})


def _simulate_into_store(store, plan, p_a: float, seed: int) -> int:
    """Demo only: simulated A/B judgments written through the store as the screen would (side mapping applied)."""
    from evaluation.sbs.judgments_store import AlreadyJudged
    from evaluation.sbs.sbs_demo import simulate_judgments
    from evaluation.sbs.sbs_scores import unswap_choice

    sides = {(a.annotator, a.item_id): a.a_on_left for a in plan.assignments}
    written = 0
    for r in simulate_judgments(plan, p_a=p_a, seed=seed).itertuples(index=False):
        # the swap is its own inverse: A/B -> screen is the same mapping as screen -> A/B
        try:
            store.record(r.annotator, r.item_id, r.criterion, unswap_choice(r.choice, sides[(r.annotator, r.item_id)]))
            written += 1
        except AlreadyJudged:  # re-materialization keeps the first simulated run
            pass
    return written


def _model_run_id(client, experiment_id: str, model: str) -> str:
    """The MLflow run of a compared model (tag ``k5_model``); created when the model has none yet."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.k5_model = '{model}'", max_results=1,
                              order_by=["attributes.start_time ASC"])
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"model/{model}", tags={"k5_model": model})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _flat_metrics(summary: dict, prefix: str) -> dict[str, float]:
    from evaluation.sbs.sbs_scores import GROUPS

    out: dict[str, float] = {}
    for name, scores in list(summary["criteria"].items()) + [(g, summary.get(g)) for g in GROUPS]:
        if scores:
            out[f"{prefix}{name}.model1"] = scores["model1"]
            out[f"{prefix}{name}.model2"] = scores["model2"]
    for key in ("pairwise_agreement", "krippendorff_alpha"):
        if summary.get(key) is not None:
            out[f"{prefix}{key}"] = float(summary[key])
    return out


@dg.asset(
    partitions_def=sbs_partitions,
    deps=[sbs_batch],
    group_name="evaluation",
    kinds={"mlflow", "duckdb"},
    owners=["team:k5-lifecycle"],
    tags={"stage": "evaluation"},
    description="SBS aggregation (report §8.2 formulas), bootstrap intervals, agreement, golden accuracy, stacked "
                "preference bars (PNG + HTML), logged to MLflow on the compared models' runs.",
    check_specs=[dg.AssetCheckSpec("judged_overlap", asset="sbs_report",
                                   description="every pair was judged by at least the planned overlap of annotators")],
)
def sbs_report(context: dg.AssetExecutionContext, config: SbsReportConfig, k5_home: K5HomeResource,
               mlflow: MLflowResource):
    from mlflow.tracking import MlflowClient

    from evaluation.sbs.judgments_store import JudgmentsStore
    from evaluation.sbs.sbs_plan import Plan, under_covered
    from evaluation.sbs.sbs_report import html_report, stacked_bars_png
    from evaluation.sbs.sbs_scores import full_summary, read_judgments, split_valid

    comparison = context.partition_key
    root = batch_dir(k5_home, comparison)
    if not (root / "plan.json").exists():
        raise dg.Failure(f"no SBS batch for {comparison!r}: materialize sbs_batch first")
    plan = Plan.from_json((root / "plan.json").read_text())
    invalid: list[int] = []
    if config.judgments_path:
        valid, invalid = split_valid(read_judgments(config.judgments_path))
        source = config.judgments_path
    else:
        import duckdb

        try:
            store = JudgmentsStore(root / "judgments.duckdb")
        except duckdb.IOException as exc:  # the app holds the file's write lock while it runs
            raise dg.Failure(f"cannot open {root / 'judgments.duckdb'} ({exc}); stop the annotation app first") from exc
        with store:
            store.load_plan(plan)
            if config.simulate or (config.simulate is None and comparison.startswith("demo_")):
                context.log.info(f"simulated judgments written: {_simulate_into_store(store, plan, config.p_a, 0)}")
            valid = store.judgments_frame()[["item_id", "annotator", "criterion", "choice"]]
        source = str(root / "judgments.duckdb")
    golden = plan.golden_map()
    summary = full_summary(valid, golden=golden, n_boot=config.n_boot)
    summary["invalid_rows"] = invalid
    per_item = valid.groupby("item_id")["annotator"].nunique().to_dict()
    cov = {i.item_id: int(per_item.get(i.item_id, 0)) for i in plan.items}
    short = under_covered(cov, plan.overlap, golden)

    name_a, name_b = plan.meta.get("model_a", "A"), plan.meta.get("model_b", "B")
    out = root / "report"
    png = stacked_bars_png(summary["distribution"], name_a, name_b, out / "sbs_bars.png", title=comparison)
    page = html_report(summary, name_a, name_b, png, out / "sbs_report.html", title=comparison)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    metrics = _flat_metrics(summary, "sbs.")
    with mlflow.start_run(f"sbs_report/{comparison}", tags={"k5_comparison": comparison}) as run:
        import mlflow as mlf

        mlf.log_params({"comparison": comparison, "model_a": name_a, "model_b": name_b, "source": source,
                        "overlap": plan.overlap})
        mlf.log_metrics(metrics)
        for f in (png, page, out / "summary.json"):
            mlf.log_artifact(str(f), artifact_path="sbs")
        report_url = mlflow.run_url(run)
        exp_id = run.info.experiment_id
    client = MlflowClient(mlflow.resolved_tracking_uri())
    # Each model's run gets its own side of the scores ("model1" for A, "model2" for B) under the comparison.
    for model, side in ((name_a, "model1"), (name_b, "model2")):
        run_id = _model_run_id(client, exp_id, model)
        for k, v in metrics.items():
            if k.endswith(f".{side}"):
                client.log_metric(run_id, f"sbs.{comparison}.{k[4:-len(side) - 1]}", v)
        client.log_artifact(run_id, str(page), artifact_path=f"sbs/{comparison}")
        client.log_artifact(run_id, str(png), artifact_path=f"sbs/{comparison}")

    def score(group: str) -> str:
        s = summary.get(group)
        return "no ratings" if not s else f"{name_a} {s['model1']:.3f} / {name_b} {s['model2']:.3f}"

    yield dg.MaterializeResult(metadata={
        "overall_visual_quality": score("overall_visual_quality"),
        "overall_motion": score("overall_motion"),
        "overall_prompt_following": score("overall_prompt_following"),
        "pairwise_agreement": summary["pairwise_agreement"],
        "krippendorff_alpha": summary["krippendorff_alpha"],
        "judgments": summary["n_judgments"], "invalid_rows": len(invalid),
        "report_html": dg.MetadataValue.path(str(page)), "bars_png": dg.MetadataValue.path(str(png)),
        "mlflow_run": dg.MetadataValue.url(report_url),
    })
    yield dg.AssetCheckResult(
        check_name="judged_overlap", passed=not short,
        metadata={"under_covered_pairs": len(short), "planned_overlap": plan.overlap,
                  "min_annotators": min((n for k, n in cov.items() if k not in golden), default=0),
                  "examples": dg.MetadataValue.json(dict(list(short.items())[:10]))})


sbs_assets = [sbs_batch, sbs_report]

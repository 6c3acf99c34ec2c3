"""Release assets (group ``release``): ``release`` registers a trained stage's pipeline folder in the MLflow model
registry (one partition per model family), and its blocking ``champion_gate`` check moves alias ``champion`` when the
SBS comparison shows the candidate beating the current champion.

Logic lives in ``k5data.publish`` (immutable object-store copy + manifest), ``orchestration.registry`` (MLflow),
``evaluation.release_gate`` (the decision) and ``evaluation.model_card``; this module only wires them to the lineage
recorded by the upstream assets (``train_<stage>`` and ``sbs_report`` materializations).
"""

# No `from __future__ import annotations`: Dagster resolves the Config classes from live annotations.
import dataclasses
import json
import warnings
from pathlib import Path

import dagster as dg
from pydantic import Field

from evaluation.model_card import ReleaseLineage
from evaluation.release_gate import OVERALL_GROUPS
from k5model.training.stages import CHAINS, get_table_stage, lineage
from orchestration.lineage import Context, latest_metadata, stage_pipeline_dir
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource

FAMILIES = dg.StaticPartitionsDefinition(list(CHAINS))


class ReleaseConfig(dg.Config):
    stage: str | None = Field(None, description="stage of the family's chain to release; unset: its last stage")
    comparison: str | None = Field(None, description="sbs_report partition that gates the release; unset: "
                                   "'<stage>_vs_<first stage of the chain>' if registered (Video Lite: the demo "
                                   "comparison), else '<stage>_vs_<parent stage>'")
    margin: float = Field(0.0, description="the lower bound of the candidate's 95% advantage interval must exceed "
                          "this on every gated group for `champion` to move")
    groups: list[str] = Field(default_factory=lambda: list(OVERALL_GROUPS), description="overall SBS groups gated")
    allow_simulated: bool = Field(True, description="let simulated judgments (demo) move `champion`")
    latency_steps: int | None = Field(4, description="Euler steps of the model card's latency measurement (one "
                                      "generation through K5Pipeline); None: not measured")
    latency_device: str = Field("cpu", description="torch device of the latency measurement")
    sft_soup: bool = Field(False, description="release the family's SFT soup (sft_soup, report §6.4) instead of a "
                           "stage; gated by 'soup_vs_pretrain' unless `comparison` is set")
    distilled: str | None = Field(None, description="release a distilled model instead of a stage: 'flash' (the "
                                  "flash asset, report §6.5), gated by 'flash_vs_<teacher stage>' unless `comparison` "
                                  "is set")
    rl_model: bool = Field(False, description="release the RL model (rl_model, DRaFT-K, report §6.6) instead of a "
                           "stage; gated by 'rl_vs_soup' unless `comparison` is set")


def stage_and_comparison(family: str, config: ReleaseConfig) -> tuple[str, str]:
    """The stage to release and the SBS comparison that gates it (checked against the SBS registry)."""
    from evaluation.sbs.comparisons import COMPARISONS

    chain = CHAINS[family]
    stage = config.stage or chain[-1]
    if stage not in chain:
        raise dg.Failure(f"stage {stage!r} is not in the {family} chain ({', '.join(chain)})")
    unknown = [g for g in config.groups if g not in OVERALL_GROUPS]
    if unknown or not config.groups:
        raise dg.Failure(f"groups {config.groups}: choose one or more of {list(OVERALL_GROUPS)}")
    parent = get_table_stage(stage).parent
    tried = [config.comparison] if config.comparison else [f"{stage}_vs_{s}" for s in (chain[0], parent) if s]
    comparison = next((c for c in tried if c in COMPARISONS), None)
    if comparison is None or stage not in (m.ref for m in COMPARISONS[comparison].models):
        raise dg.Failure(f"no SBS comparison of {stage} to gate the release (tried {tried}); set `comparison` to a "
                         "registered one that includes it")
    return stage, comparison


def release_lineage(context: Context, home: K5HomeResource, family: str, stage: str,
                    comparison: str) -> tuple[ReleaseLineage, Path]:
    """The stage's lineage and pipeline folder, read from the stage assets' latest materializations."""
    meta = latest_metadata(context, f"train_{stage}")
    runs: dict[str, str] = {}
    for s in lineage(stage):
        try:
            run_id = (meta if s == stage else latest_metadata(context, f"train_{s}")).get("mlflow_run_id")
        except dg.Failure:  # an ancestor trained elsewhere (init_from) has no materialization here
            continue
        if run_id:
            runs[s] = str(run_id)
    folder = Path(str(meta.get("pipeline_dir") or stage_pipeline_dir(home.paths, stage)))
    data = {k: v for k, v in meta.items() if k.startswith(("samples", "tokens")) and isinstance(v, int | float)}
    return ReleaseLineage(family=family, stage=stage, stages=tuple(lineage(stage)), training_run_ids=runs,
                          dataset_snapshot=meta.get("dataset_snapshot"), shard_index_uri=meta.get("shard_index_uri"),
                          data=data, comparison=comparison, dagster_run_id=context.run_id), folder


def soup_lineage(context: Context, home: K5HomeResource, family: str,
                 config: ReleaseConfig) -> tuple[ReleaseLineage, Path, str]:
    """The SFT soup's lineage (its start stage's chain + ``sft_soup``), pipeline folder and gating comparison."""
    meta = latest_metadata(context, "sft_soup")
    if meta.get("family") != family:
        raise dg.Failure(f"the latest sft_soup is of family {meta.get('family')!r}, not {family!r}")
    comparison = config.comparison or "soup_vs_pretrain"
    start = str(meta["start_stage"])
    base, _ = release_lineage(context, home, family, start, comparison)
    runs = {**base.training_run_ids, "sft_soup": str(meta["mlflow_run_id"])}
    return (ReleaseLineage(family=family, stage="sft_soup", stages=(*lineage(start), "sft_soup"),
                           training_run_ids=runs, dataset_snapshot=base.dataset_snapshot,
                           shard_index_uri=base.shard_index_uri, data=base.data, comparison=comparison,
                           dagster_run_id=context.run_id), Path(str(meta["pipeline_dir"])), comparison)


def distilled_lineage(context: Context, home: K5HomeResource, family: str,
                      config: ReleaseConfig) -> tuple[ReleaseLineage, Path, str]:
    """A distilled model's lineage (its teacher stage's chain + the distillation assets down to it), pipeline folder
    (with its own ``sampling_config.json``) and gating comparison."""
    from evaluation.sbs.comparisons import DISTILL_REFS

    asset = str(config.distilled)
    if asset not in DISTILL_REFS:
        raise dg.Failure(f"distilled {asset!r} is not one of {list(DISTILL_REFS)}")
    meta = latest_metadata(context, asset)
    teacher = str(meta["teacher_stage"]).removeprefix("train_")
    if teacher not in CHAINS[family]:
        raise dg.Failure(f"{asset}'s teacher {teacher} is not in the {family} chain")
    comparison = config.comparison or f"{asset}_vs_{teacher}"
    base, _ = release_lineage(context, home, family, teacher, comparison)
    chain = DISTILL_REFS[:DISTILL_REFS.index(asset) + 1]
    runs = dict(base.training_run_ids)
    for step in chain:
        run_id = latest_metadata(context, step).get("mlflow_run_id")
        if run_id:
            runs[step] = str(run_id)
    return (ReleaseLineage(family=family, stage=asset, stages=(*lineage(teacher), *chain), training_run_ids=runs,
                           dataset_snapshot=base.dataset_snapshot, shard_index_uri=base.shard_index_uri,
                           data=base.data, comparison=comparison, dagster_run_id=context.run_id),
            Path(str(meta["pipeline_dir"])), comparison)


def rl_lineage(context: Context, home: K5HomeResource, family: str,
               config: ReleaseConfig) -> tuple[ReleaseLineage, Path, str]:
    """The RL model's lineage (the SFT soup's lineage + ``reward_model`` + ``rl_model``), its pipeline folder and
    gating comparison."""
    meta = latest_metadata(context, "rl_model")
    if meta.get("family") != family:
        raise dg.Failure(f"the latest rl_model is of family {meta.get('family')!r}, not {family!r}")
    comparison = config.comparison or "rl_vs_soup"
    soup, _, _ = soup_lineage(context, home, family, config)
    runs = {**soup.training_run_ids, "reward_model": str(latest_metadata(context, "reward_model")["mlflow_run_id"]),
            "rl_model": str(meta["mlflow_run_id"])}
    return (dataclasses.replace(soup, stage="rl_model", stages=(*soup.stages, "reward_model", "rl_model"),
                                training_run_ids=runs, comparison=comparison), Path(str(meta["pipeline_dir"])),
            comparison)


def sbs_summary(context: Context, home: K5HomeResource, comparison: str) -> tuple[dict, Path]:
    """The SBS summary the comparison's latest ``sbs_report`` wrote."""
    meta = latest_metadata(context, "sbs_report", partition=comparison)
    path = Path(str(meta.get("summary_path") or home.paths.home / "sbs" / comparison / "report" / "summary.json"))
    if not path.is_file():
        raise dg.Failure(f"SBS summary {path} is missing; materialize sbs_report for {comparison!r} again")
    summary = json.loads(path.read_text())
    summary.setdefault("comparison", comparison)
    return summary, path


@dg.asset(
    partitions_def=FAMILIES,
    group_name="release",
    deps=[*(dg.AssetDep(f"train_{stages[-1]}") for stages in CHAINS.values()),
          dg.AssetDep("sbs_report", partition_mapping=dg.AllPartitionMapping()), "sft_soup", "flash", "rl_model"],
    kinds={"mlflow"},
    owners=["team:k5-lifecycle"],
    description="Registers a trained stage's complete pipeline folder as a new version of `k5-<family>` in the MLflow "
                "registry: immutable object-store copy with a sha256 manifest as the source, lineage tags, model card; "
                "alias `candidate`.",
)
def release(context: dg.AssetExecutionContext, config: ReleaseConfig, k5_home: K5HomeResource,
            mlflow: MLflowResource, object_store: ObjectStoreResource) -> dg.MaterializeResult:
    from evaluation.model_card import measure_latency, render_model_card
    from k5data.publish import manifest_summary, publish_folder
    from orchestration.registry import CANDIDATE, model_name, register_release

    family = context.partition_key
    special = soup_lineage if config.sft_soup else rl_lineage if config.rl_model else \
        distilled_lineage if config.distilled else None
    if special is not None:
        lineage_, folder, comparison = special(context, k5_home, family, config)
        stage = lineage_.stage
    else:
        stage, comparison = stage_and_comparison(family, config)
        lineage_, folder = release_lineage(context, k5_home, family, stage, comparison)
    summary, summary_path = sbs_summary(context, k5_home, comparison)
    published = publish_folder(folder, object_store.store(), family)
    name, facts = model_name(family), manifest_summary(published)
    latency = None if config.latency_steps is None else measure_latency(folder, steps=config.latency_steps,
                                                                          device=config.latency_device)
    card = render_model_card(name=name, lineage=lineage_, source_uri=published.uri, summary=summary, latency=latency,
                             manifest_sha256=published.manifest.sha256, total_bytes=published.manifest.total_bytes)
    version = register_release(mlflow.resolved_tracking_uri(), mlflow.experiment_id(), lineage=lineage_,
                               published=published, card=card,
                               run_tags={"dagster_asset": "release", "dagster_run_id": context.run_id})
    context.log.info(f"{name} version {version.version} ({'reused' if version.reused else 'new'}): {published.uri}")
    return dg.MaterializeResult(metadata={
        **facts, "model": name, "version": version.version, "models_uri": f"models:/{name}@{CANDIDATE}",
        "reused_version": version.reused, "stage": stage, "comparison": comparison, "summary_path": str(summary_path),
        "margin": config.margin, "groups": dg.MetadataValue.json(config.groups),
        "allow_simulated": config.allow_simulated, "release_run_id": version.run_id,
        "model_card": dg.MetadataValue.md(card),
    })


def _champion_gate(context: dg.AssetCheckExecutionContext, mlflow: MLflowResource) -> dg.AssetCheckResult:
    from orchestration.registry import CHAMPION, alias_version, apply_gate

    meta = latest_metadata(context, "release", partition=context.partition_key)
    summary = json.loads(Path(str(meta["summary_path"])).read_text())
    uri = mlflow.resolved_tracking_uri()
    decision = apply_gate(uri, str(meta["model"]), str(meta["version"]), summary, margin=float(meta["margin"]),
                          groups=list(meta["groups"]), allow_simulated=bool(meta["allow_simulated"]))
    champion = alias_version(uri, str(meta["model"]), CHAMPION)
    groups = {g.group: {"passed": g.passed, "candidate": g.candidate_score, "baseline": g.baseline_score,
                        "advantage_ci95": list(g.interval) if g.interval else None} for g in decision.groups}
    return dg.AssetCheckResult(passed=decision.promote, metadata={
        "decision": decision.decision, "reason": decision.reason, "margin": decision.margin,
        "candidate": f"{decision.candidate} (version {meta['version']})", "baseline": decision.baseline or "",
        "champion_now": "none" if champion is None else f"version {champion.version}",
        "simulated_judgments": decision.simulated, "groups": dg.MetadataValue.json(groups),
        "explanation": dg.MetadataValue.md("\n".join(decision.lines()))})


GATE_DESCRIPTION = (
    "Release gate: moves alias `champion` to this version only when the SBS comparison shows it beating "
    "the current champion (or, with no champion yet, the comparison's baseline) by more than `margin`: "
    "the lower bound of the paired 95% bootstrap interval of its advantage on every gated overall "
    "group. Blocking: when it keeps the current champion the check fails, and so does the run.")
with warnings.catch_warnings():  # partitioned asset checks are a Dagster preview; we want one gate result per family
    warnings.simplefilter("ignore", dg.PreviewWarning)
    champion_gate = dg.asset_check(asset=release, name="champion_gate", blocking=True, partitions_def=FAMILIES,
                                   description=GATE_DESCRIPTION)(_champion_gate)

"""How an SFT partition fine-tunes and how the soup is made (report §6.4), on the pre-training path.

A partition's fine-tune is the start stage's ``TrainJob`` (``stage_runs.build_job``: same Pipes client, same resume
folder, same publish) pointed at the partition's SFT shards, starting from the chosen pre-trained weights, with the
SFT batch and learning rate. It trains in rounds of ``steps_per_round`` steps (each round resumes the previous one's
checkpoint); after each round the exported EMA weights are scored on the partition's validation items
(``k5data.sft.validation.validation_loss``: fixed seeds and timesteps) and its last sample generations by the artifact
proxy, against the starting model's; ``EarlyStop`` (plus a human verdict file) decides whether to go on. The best
round's EMA transformer is exported as a complete pipeline folder. One MLflow run per partition.

The soup reads every partition's recorded transformer and size, weights them with ``k5model.soup.SoupRecipe`` (video:
uniform over the domains; image: subdomains by sqrt size inside each domain, then the domains), merges them streamed,
exports a pipeline folder and scores the soup and each member on the union of the partitions' validation items.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from k5data.sft.validation import EarlyStop, artifact_score, human_verdict, read_sample_frames, validation_loss
from k5model.soup import SoupIngredient, SoupRecipe
from orchestration.settings import K5Paths
from orchestration.stage_runs import StageInputs, build_job, hold_stage, prepare_work, publish, read_metrics, work_dir

SFT_CHAIN = "sft"  # MLflow lineage run the partition runs nest under


@dataclass(frozen=True, kw_only=True)
class SftRunSettings:
    """A partition's fine-tune, from the asset config."""

    start_stage: str
    start_transformer: str
    base_pipeline: str
    store_uri: str
    demo: bool
    batch: int | None
    lr: float | None
    steps_per_round: int
    max_rounds: int
    patience: int
    artifact_tolerance: float
    sample_steps: int
    prompts_file: str | None  # validation prompts of the round-end samples; None: no samples


def sft_dir(paths: K5Paths, key: str) -> Path:
    return paths.models / "sft" / key


def _artifact(folder: Path) -> float | None:
    steps = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.is_dir() else []
    frames = read_sample_frames(steps[-1]) if steps else []
    return sum(artifact_score(f) for f in frames) / len(frames) if frames else None


def run_partition(context: dg.AssetExecutionContext, layout: dict[str, Any], s: SftRunSettings, paths: K5Paths,
                  mlflow: Any, training_job: Any, store: Any) -> dict[str, Any]:
    """Fine-tune one partition in rounds until ``EarlyStop`` says stop, under the partition's one-writer lease;
    returns the materialization metadata."""
    out = sft_dir(paths, layout["key"])
    with hold_stage(out, f"Dagster run {context.run_id}", asset=f"sft_models[{layout['key']}]") as lease:
        run_id, reason, stop, start_loss = _fine_tune(context, layout, s, paths, mlflow, training_job, store)
        lease.check()
        publish(work_dir(out), out)
    return _published(out, layout, s, mlflow, run_id, reason, stop, start_loss)


def _fine_tune(context: dg.AssetExecutionContext, layout: dict[str, Any], s: SftRunSettings, paths: K5Paths,
               mlflow: Any, training_job: Any, store: Any) -> tuple[str, str, EarlyStop, float]:
    """The rounds of one partition's fine-tune in its work folder, then the best round's pipeline export: (MLflow run
    id, stop reason, stop rule, start validation loss)."""
    from mlflow.tracking import MlflowClient

    from k5model.checkpoint import assemble_pipeline_folder

    key = layout["key"]
    work = work_dir(sft_dir(paths, key))
    shard_meta = {"prefix": layout["prefix"], "classes": layout["classes"]}
    inputs = StageInputs(stage=s.start_stage, chain=SFT_CHAIN, steps=s.steps_per_round, demo=s.demo, ckpt_every=0,
                         init=s.start_transformer, base_pipeline=s.base_pipeline, shard_meta=shard_meta,
                         store_uri=s.store_uri, sample_every=0 if s.prompts_file else None,
                         sample_steps=s.sample_steps,
                         prompts_file=s.prompts_file)
    job, why = build_job(inputs, work)
    job = job.replace(lr=s.lr, batch=s.batch)
    prepare_work(work, job, context.log)
    params = {**{f"sft.{k}": v for k, v in asdict(s).items()}, **{f"job.{k}": v for k, v in job.flat().items()},
              "partition": key, "size": layout["size"]}
    run_id = mlflow.start_stage_run(SFT_CHAIN, f"sft/{key}", context.run_id, params, {
        "dagster_asset": "sft_models", "k5_partition": key, "k5_start_stage": s.start_stage,
        "k5_shard_classes_reason": why})
    env = {"MLFLOW_TRACKING_URI": mlflow.resolved_tracking_uri(), "K5_MLFLOW_RUN_ID": run_id}
    val = [layout["val_prefix"]]
    stop = EarlyStop(patience=s.patience, artifact_tolerance=s.artifact_tolerance)
    start_loss = validation_loss(s.start_transformer, s.base_pipeline, store, val)
    start_artifact = _artifact(Path(s.start_transformer).parent.parent / "samples")
    reason = f"max_rounds {s.max_rounds} reached"
    try:
        for r in range(1, s.max_rounds + 1):
            job = job.replace(steps=r * s.steps_per_round)
            (work / "job.json").write_text(job.to_json())
            training_job.run(context, job, env)
            step = r * s.steps_per_round
            loss = validation_loss(work / "ema" / "transformer", s.base_pipeline, store, val)
            verdict = human_verdict(paths.home / "sft" / "human_checks" / f"{key}.json", step)
            why_stop = stop.update(step, loss, _artifact(work / "samples"), start_artifact, verdict)
            MlflowClient(mlflow.resolved_tracking_uri()).log_metric(run_id, "val_flow_matching_loss", loss, step=step)
            if stop.best()["step"] == step:
                shutil.rmtree(work / "best", ignore_errors=True)
                shutil.copytree(work / "ema" / "transformer", work / "best" / "transformer")
            context.log.info(f"{key} step {step}: validation loss {loss:.5f} (start {start_loss:.5f})")
            if why_stop:
                reason = why_stop
                break
    except BaseException:
        mlflow.end_stage_run(run_id, failed=True)
        raise
    (work / "early_stop.json").write_text(json.dumps({"reason": reason, "history": stop.history,
                                                       "start_loss": start_loss}, indent=2))
    # the best round as a complete pipeline, inside the work folder: it is published with the rest, in one swap
    assemble_pipeline_folder(s.base_pipeline, work / "best" / "transformer", work / "pipeline")
    return run_id, reason, stop, start_loss


def _published(out: Path, layout: dict[str, Any], s: SftRunSettings, mlflow: Any, run_id: str, reason: str,
               stop: EarlyStop, start_loss: float) -> dict[str, Any]:
    """Close the published partition's MLflow run; the materialization metadata."""
    best = stop.best()
    url = mlflow.end_stage_run(run_id, tags={"k5_stop_reason": reason, "k5_best_step": str(best["step"]),
                                             "k5_pipeline_uri": (out / "pipeline").as_uri()})
    metrics = read_metrics(out / "metrics.jsonl")
    return {"partition": layout["key"], "domain": layout["domain"], "subdomain": layout["subdomain"] or "",
            "size": layout["size"], "weights_kind": "ema", "transformer_dir": str(out / "best" / "transformer"),
            "pipeline_dir": str(out / "pipeline"), "val_prefix": layout["val_prefix"], "mlflow_run_id": run_id,
            "mlflow_run": dg.MetadataValue.url(url), "start_stage": s.start_stage, "start_val_loss": start_loss,
            "start_pipeline": str(Path(s.start_transformer).parent.parent / "pipeline"),
            "base_pipeline": s.base_pipeline,
            "best_step": best["step"], "best_val_loss": best["val_loss"], "stop_reason": reason,
            "rounds": len(stop.history), "history": dg.MetadataValue.json(stop.history),
            "steps": len(metrics), "final_loss": metrics[-1]["loss"] if metrics else float("nan")}


def soup_recipe(members: list[dict[str, Any]], hierarchical: bool, domain_scheme: str) -> SoupRecipe:
    """The soup of the partitions' recorded fine-tunes (``sft_models`` metadata)."""
    ingredients = [SoupIngredient(path=str(m["transformer_dir"]), domain=str(m["domain"]), size=int(m["size"]),
                                  weights_kind=str(m.get("weights_kind", "ema")),  # type: ignore[arg-type]
                                  subdomain=str(m["subdomain"]) or None) for m in members]
    if hierarchical:
        return SoupRecipe.image(ingredients, domain_scheme=domain_scheme)  # type: ignore[arg-type]
    return SoupRecipe.video(ingredients)


def make_soup(members: list[dict[str, Any]], *, hierarchical: bool, domain_scheme: str, out: Path,
              base_pipeline: str, store: Any) -> dict[str, Any]:
    """Merge, export the pipeline folder, and score soup and members on the union of the validation items."""
    from k5data.loading.training_source import TextEncoders
    from k5model.checkpoint import assemble_pipeline_folder
    from k5model.soup import soup

    if not members:
        raise dg.Failure("no sft_models partition has been materialized; fine-tune at least one partition first")
    recipe = soup_recipe(members, hierarchical, domain_scheme)
    soup(recipe, out / "transformer", progress=False)
    assemble_pipeline_folder(base_pipeline, out / "transformer", out / "pipeline")
    union = sorted({str(m["val_prefix"]) for m in members})
    text = TextEncoders.from_pretrained(base_pipeline)
    member_loss = {str(m["partition"]): validation_loss(m["transformer_dir"], base_pipeline, store, union, text=text)
                   for m in members}
    soup_loss = validation_loss(out / "transformer", base_pipeline, store, union, text=text)
    best = min(member_loss, key=member_loss.__getitem__)
    weights = dict(zip(member_loss, recipe.leaf_weights()))
    # the soup matches the members' weighted mean to first order in the members' differences (docs/sft.md), so that
    # mean is the fair reference of a non-uniform soup; the plain mean is the acceptance figure
    result = {"recipe": recipe.to_dict(), "weights": weights,
              "soup_val_loss": soup_loss, "member_val_loss": member_loss,
              "members_mean_val_loss": sum(member_loss.values()) / len(member_loss),
              "weighted_members_val_loss": sum(weights[k] * v for k, v in member_loss.items()),
              "best_single_domain": best,
              "best_single_domain_pipeline": next(m["pipeline_dir"] for m in members if m["partition"] == best)}
    (out / "soup.json").write_text(json.dumps(result, indent=2))
    return result


def soup_members(context: Any, partitions_name: str, family: str) -> list[dict[str, Any]]:
    """The latest ``sft_models`` metadata of every registered partition of ``family`` that has been materialized."""
    from orchestration.lineage import latest_metadata

    members = []
    for key in sorted(context.instance.get_dynamic_partitions(partitions_name)):
        if key.split(".", 1)[0] != family:
            continue
        try:
            members.append(latest_metadata(context, "sft_models", partition=key))
        except dg.Failure:
            context.log.info(f"partition {key} has no fine-tune yet; left out of the soup")
    return members


def log_soup(mlflow: Any, family: str, result: dict[str, Any], dagster_run_id: str) -> tuple[str, str]:
    """The soup's MLflow run: recipe and weights as tags (and artifact), validation losses as metrics."""
    import mlflow as mlflow_lib

    tags = {"k5_soup_recipe": json.dumps(result["recipe"])[:5000], "k5_soup_weights": json.dumps(result["weights"]),
            "k5_family": family, "dagster_asset": "sft_soup", "dagster_run_id": dagster_run_id,
            "k5_best_single_domain": result["best_single_domain"]}
    with mlflow.start_run(f"sft_soup/{family}", tags=tags) as run:
        mlflow_lib.log_metrics({"soup_val_loss": result["soup_val_loss"],
                                "members_mean_val_loss": result["members_mean_val_loss"],
                                **{f"member_val_loss.{k}": v for k, v in result["member_val_loss"].items()}})
        mlflow_lib.log_dict(result, "soup.json")
        return run.info.run_id, mlflow.run_url(run)

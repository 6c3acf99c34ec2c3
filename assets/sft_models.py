"""Supervised fine-tuning assets (report §4.6, §6.4; group ``sft``):

``sft_partitions`` (the SFT mix -> caption variants, subdomains, one shard prefix per (sub)domain; registers the
partition keys) -> ``sft_models`` (dynamic partitions, one fine-tune per (sub)domain through the pre-training Pipes
path, early-stopped on validation) -> ``sft_soup`` (streamed weighted merge of the partitions, exported as a complete
pipeline folder). The SBS comparisons ``soup_vs_pretrain`` and ``soup_vs_best_single_domain`` read ``sft_soup``.

Production settings differ from the defaults (demo scale) in ``PRODUCTION_SFT``: images batch 64 and lr 1e-5 (§6.4.1),
the rewriter a local Qwen3-32B snapshot.
"""

# No `from __future__ import annotations`: Dagster resolves the Config classes from live annotations.
import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from orchestration.lineage import latest_metadata, stage_dir, upstream_path
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource, TrainingJobResource

SFT_PARTITIONS = dg.DynamicPartitionsDefinition(name="sft_partitions")
# where each family's SFT starts: its chain's last pre-training stage
START_STAGES = {"video_lite": "video_lite_mr_10s", "image_lite": "image_lite_hr"}
PRODUCTION_SFT = {"sft_partitions": {"family": "image_lite", "kinds": ["image"], "rewriter": "models/Qwen3-32B"},
                  "sft_models": {"demo": False, "batch": 64, "lr": 1e-5, "steps_per_round": 1000, "max_rounds": 20},
                  "sft_soup": {"family": "image_lite", "domain_scheme": "equal"}}


class SftPartitionsConfig(dg.Config):
    family: str = Field("video_lite", description="model family fine-tuned: video_lite / video_pro (domains) or "
                        "image_lite (subdomains chosen by silhouette inside each domain)")
    kinds: list[str] = Field(default_factory=lambda: ["image", "video"], description="item kinds trained")
    min_items: int = Field(2, description="partitions with fewer items are left out")
    max_partitions: int | None = Field(3, description="keep the largest N partitions (demo: 3); None: all")
    val_fraction: float = Field(0.25, description="share of each partition held out for validation")
    rewriter: str = Field("tiny", description="caption rewriter LM: a folder (relative to K5_HOME or absolute) with "
                          "an instruct causal LM (production: Qwen3-32B); 'tiny': a tiny random Qwen3 LM (demo)")
    max_new_tokens: int = Field(32, description="tokens per rewrite answer (production: 384)")


class SftModelsConfig(dg.Config):
    start_stage: str | None = Field(None, description="pre-trained stage to start from; unset: the family's last")
    demo: bool = Field(True, description="demo-scale model (tiny preset on CPU)")
    batch: int | None = Field(None, description="samples per step (production images: 64); unset: the stage's")
    lr: float | None = Field(None, description="peak learning rate (production: 1e-5); unset: the stage's")
    steps_per_round: int = Field(2, description="steps between two validations")
    max_rounds: int = Field(2, description="most validations before stopping")
    patience: int = Field(1, description="validations without improvement before stopping")
    artifact_tolerance: float = Field(1.5, description="stop when the samples' artifact score exceeds this "
                                      "multiple of the starting model's")
    samples: bool = Field(True, description="generate validation samples at the end of each round (the artifact "
                          "proxy's input); off: the stop rule uses the validation loss and the human verdicts only")
    sample_steps: int = Field(2, description="sampler steps of the validation samples")


class SftSoupConfig(dg.Config):
    family: str = Field("video_lite", description="which family's partitions to merge")
    domain_scheme: str = Field("equal", description="weights of the domains: equal / size / sqrt_size (image "
                               "subdomains are always sqrt_size inside their domain)")


@dg.asset(group_name="sft", kinds={"pytorch"}, owners=["team:k5-lifecycle"],
          deps=["sft_mix", "latent_shards", "image_latent_shards", "tiny_model_bundle"],
          description="The SFT mix split into fine-tune partitions with caption variants (5 lengths x EN/RU) in their "
          "own latent shards; registers the `sft_partitions` keys.")
def sft_partitions(context: dg.AssetExecutionContext, config: SftPartitionsConfig, k5_home: K5HomeResource,
                   object_store: ObjectStoreResource) -> dg.MaterializeResult:
    import pandas as pd

    from assets.training import latent_set
    from k5data.sft.build import build_partitions
    from k5data.sft.dataset import SftPartitionConfig
    from k5data.sft.variants import RewriterConfig, write_tiny_lm

    home = k5_home.paths.home
    base = upstream_path(context, "tiny_model_bundle")
    lm = home / "models" / "tiny_rewriter" if config.rewriter == "tiny" else home / config.rewriter
    if config.rewriter == "tiny" and not (lm / "config.json").is_file():
        write_tiny_lm(lm, base / "tokenizer")
    rows = pd.read_parquet(str(latest_metadata(context, "sft_mix")["path"])).to_dict("records")
    cfg = SftPartitionConfig(family=config.family, kinds=tuple(config.kinds), min_items=config.min_items,
                             max_partitions=config.max_partitions, val_fraction=config.val_fraction)
    shards = str(latest_metadata(context, latent_set(START_STAGES[config.family]))["prefix"])
    plan = build_partitions(rows, object_store.store(), shards,
                            f"sft/{config.family}", cfg, RewriterConfig(model_path=str(lm),
                                                                         max_new_tokens=config.max_new_tokens),
                            home / "sft" / "partitions" / f"{config.family}.json", log=context.log.info)
    keys = [p["key"] for p in plan["partitions"]]
    context.instance.add_dynamic_partitions(SFT_PARTITIONS.name, keys)
    return dg.MaterializeResult(metadata={
        "family": config.family, "partitions": dg.MetadataValue.json(keys), "items": plan["items"],
        "plan_path": dg.MetadataValue.path(str(home / "sft" / "partitions" / f"{config.family}.json")),
        "items_path": dg.MetadataValue.path(str(home / "sft" / "partitions" / f"{config.family}.items.parquet")),
        "subdomains": dg.MetadataValue.json(plan["subdomains"]), "skipped": dg.MetadataValue.json(plan["skipped"]),
        "variant_sources": dg.MetadataValue.json(plan["variant_sources"]), "rewriter": plan["rewriter"],
        "example_variants": dg.MetadataValue.json(plan["example_variants"])})


@dg.asset(group_name="sft", partitions_def=SFT_PARTITIONS, kinds={"pytorch", "mlflow"}, owners=["team:k5-lifecycle"],
          deps=["sft_partitions", "tiny_model_bundle", "tiny_image_bundle",
                *(f"train_{s}" for s in START_STAGES.values())], pool="gpu",
          description="One fine-tune per SFT (sub)domain partition, from a pre-trained stage's EMA weights through "
          "the stages' Pipes job; stops when the validation flow-matching loss (fixed seeds and timesteps) stops "
          "improving or the samples show artifacts; one MLflow run per partition.")
def sft_models(context: dg.AssetExecutionContext, config: SftModelsConfig, k5_home: K5HomeResource,
               mlflow: MLflowResource, object_store: ObjectStoreResource,
               training_job: TrainingJobResource) -> dg.MaterializeResult:
    from assets.training import base_bundle, write_validation_prompts
    from orchestration.sft_runs import SftRunSettings, run_partition

    key = context.partition_key
    # each family has its own plan file beside the latest one: a later image_lite plan keeps video keys valid
    plan_path = Path(str(latest_metadata(context, "sft_partitions")["plan_path"])).with_name(
        f"{key.split('.', 1)[0]}.json")
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {"partitions": []}
    layout = next((p for p in plan["partitions"] if p["key"] == key), None)
    if layout is None:
        raise dg.Failure(f"partition {key} is not in the sft_partitions plan {plan_path}; materialize sft_partitions "
                         "for its family")
    stage = config.start_stage or START_STAGES[plan["family"]]
    start = str(latest_metadata(context, f"train_{stage}").get("transformer_dir")
                or stage_dir(k5_home.paths, stage) / "ema" / "transformer")
    settings = SftRunSettings(
        start_stage=stage, start_transformer=start, base_pipeline=str(upstream_path(context, base_bundle(stage))),
        store_uri=object_store.store().uri(""), demo=config.demo, batch=config.batch, lr=config.lr,
        steps_per_round=config.steps_per_round, max_rounds=config.max_rounds, patience=config.patience,
        artifact_tolerance=config.artifact_tolerance, sample_steps=config.sample_steps,
        prompts_file=write_validation_prompts(k5_home, stage, 2) if config.samples else None)
    meta = run_partition(context, layout, settings, k5_home.paths, mlflow, training_job, object_store.store())
    return dg.MaterializeResult(metadata=meta)


@dg.asset(group_name="sft", kinds={"pytorch", "mlflow"}, owners=["team:k5-lifecycle"],
          deps=[dg.AssetDep("sft_models", partition_mapping=dg.AllPartitionMapping())],
          description="Model soup of the family's SFT partitions (video: uniform over domains; image: subdomains "
          "by sqrt size, then domains), streamed tensor by tensor; exports a complete pipeline folder, scores soup "
          "and members on the union of their validation items; recipe in metadata and MLflow tags.")
def sft_soup(context: dg.AssetExecutionContext, config: SftSoupConfig, k5_home: K5HomeResource,
             mlflow: MLflowResource, object_store: ObjectStoreResource) -> dg.MaterializeResult:
    from orchestration.sft_runs import log_soup, make_soup, soup_members

    members = soup_members(context, SFT_PARTITIONS.name, config.family)
    out = k5_home.paths.models / "sft" / f"{config.family}.soup"
    base = str(members[0]["base_pipeline"]) if members else ""
    result = make_soup(members, hierarchical=config.family == "image_lite", domain_scheme=config.domain_scheme,
                       out=out, base_pipeline=base, store=object_store.store())
    run_id, url = log_soup(mlflow, config.family, result, context.run_id)
    return dg.MaterializeResult(metadata={
        "pipeline_dir": str(out / "pipeline"), "transformer_dir": str(out / "transformer"), "family": config.family,
        "recipe": dg.MetadataValue.json(result["recipe"]), "weights": dg.MetadataValue.json(result["weights"]),
        "soup_val_loss": result["soup_val_loss"], "members_mean_val_loss": result["members_mean_val_loss"],
        "weighted_members_val_loss": result["weighted_members_val_loss"],
        "member_val_loss": dg.MetadataValue.json(result["member_val_loss"]), "mlflow_run": dg.MetadataValue.url(url),
        "mlflow_run_id": run_id, "best_single_domain": result["best_single_domain"],
        "best_single_domain_pipeline": result["best_single_domain_pipeline"],
        "start_pipeline": members[0]["start_pipeline"], "start_stage": members[0]["start_stage"]})

sft_assets = [sft_partitions, sft_models, sft_soup]

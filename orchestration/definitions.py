"""The Dagster code location: ``dagster dev -m orchestration.definitions`` (also [tool.dagster] in pyproject)."""

from __future__ import annotations

import dagster as dg

import assets.curation
import assets.distill
import assets.editing
import assets.generation
import assets.latents
import assets.models
import assets.release
import assets.rl
import assets.sbs
import assets.sft_data
import assets.sft_models
import assets.training
from orchestration.production import production_executor
from orchestration.resources import default_resources

# New asset modules go here: assets and asset checks are collected from each module.
ASSET_MODULES = [assets.models, assets.generation, assets.curation, assets.latents, assets.sbs, assets.training,
                 assets.release, assets.sft_data, assets.sft_models, assets.distill,
                 assets.rl, assets.editing]

all_assets = dg.load_assets_from_modules(ASSET_MODULES)
all_asset_checks = dg.load_asset_checks_from_modules(ASSET_MODULES)

# Partitioned assets run one partition per run, so they get jobs of their own; main_job takes everything else.
CURATION_SHARDS = dg.AssetSelection.assets("raw_sources", "scored_scenes")
SBS = dg.AssetSelection.assets("sbs_batch", "sbs_report")
RELEASE = dg.AssetSelection.assets("release")
SFT = dg.AssetSelection.assets("sft_partitions", "sft_models", "sft_soup")  # after main_job (needs trained stages)
DISTILL = dg.AssetSelection.groups("distillation")  # after main_job (starts from the last Video Lite stage)
RL = dg.AssetSelection.groups("rl")  # after the SFT soup (report §6.6)

main_job = dg.define_asset_job(
    "main_job",
    selection=dg.AssetSelection.all() - CURATION_SHARDS - SBS - RELEASE - SFT - DISTILL - RL,
    description="Every unpartitioned asset: tiny model bundle, demo generation, the curated dataset (after its "
    "shards), its latent shards, the Table 4 training stages (demo scale), and their checks.",
)
curation_shards_job = dg.define_asset_job(
    "curation_shards_job",
    selection=CURATION_SHARDS,
    partitions_def=assets.curation.SHARDS,
    description="Register and score one source shard (one run per shard; parallel runs on a cluster).",
)
sbs_job = dg.define_asset_job(
    "sbs_job",
    selection=SBS,
    partitions_def=assets.sbs.sbs_partitions,
    description="Generate an SBS batch for one comparison and aggregate its judgments into a report.",
)
release_job = dg.define_asset_job(
    "release_job",
    selection=RELEASE,
    description="Register a model family's stage in the MLflow registry (alias candidate); the champion_gate check "
    "moves alias champion when the SBS comparison passes the gate.",
)

sft_partitions_job = dg.define_asset_job(
    "sft_partitions_job",
    selection=dg.AssetSelection.assets("sft_partitions"),
    description="Split the SFT mix into fine-tune partitions: caption variants, subdomains, shards (report §4.6).")
sft_models_job = dg.define_asset_job(
    "sft_models_job",
    selection=dg.AssetSelection.assets("sft_models"),
    partitions_def=assets.sft_models.SFT_PARTITIONS,
    description="Fine-tune one SFT (sub)domain partition (report §6.4); one run per partition.")
sft_soup_job = dg.define_asset_job(
    "sft_soup_job",
    selection=dg.AssetSelection.assets("sft_soup"),
    description="Merge the fine-tuned partitions into the SFT soup and export its pipeline folder (report §6.4).")

distill_job = dg.define_asset_job(
    "distill_job",
    selection=DISTILL,
    description="Distilled models from the last Video Lite stage: CFG-distilled (50 NFE), TSCD 16 NFE, Flash, and "
    "the MagCache calibration (report §6.5, §7.2).")

rl_job = dg.define_asset_job(
    "rl_job",
    selection=RL,
    description="RL post-training from the SFT soup (report §6.6): heuristic reward pairs -> relative reward model "
    "-> DRaFT-K with a KL anchor, exported as a pipeline folder.")

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_asset_checks,
    resources=default_resources(),  # training stages run as Pipes jobs: a subprocess, or a GPU pod (K5_PIPES=k8s)
    jobs=[main_job, curation_shards_job, sbs_job, release_job, sft_partitions_job, sft_models_job, sft_soup_job,
          distill_job, rl_job],
    executor=production_executor(),  # None (steps in the run's process) unless K5_EXECUTOR=k8s: a pod per step
)

"""SFT dataset assets (report §4.6, Figure 8): ``curated_dataset -> sft_judgments -> (sft_v1, sft_v2) -> sft_mix``.

``sft_judgments`` turns the curated dataset's passed rows into an annotation batch in ``K5_HOME/sft/judgments.duckdb``
(Stage 1 screening queue; experts are assigned as items pass), which annotators fill in the app
(``python -m ui.sft_task serve-demo K5_HOME/sft``); the demo fills it with simulated annotators (``simulate``).
``sft_v1`` / ``sft_v2`` come from ONE consensus pass with one set of thresholds, so v1 ⊆ v2 by construction (and
checked). ``sft_mix`` records the sampling mix. The layout and columns are in evaluation/sft/datasets.py.
"""

# No `from __future__ import annotations`: Dagster resolves the Config classes from live annotations.
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.curation import curated_dataset
from evaluation.sft.batch import SftBatchConfig, prepare_batch
from evaluation.sft.consensus import ConsensusConfig, item_consensus
from evaluation.sft.datasets import MixConfig, build_versions, read_sft_dataset, write_mix
from evaluation.sft.simulate import SIMULATED_PREFIX, SimulatedRaters
from evaluation.sft.store import SftStore
from k5data.curation.output import read_dataset
from orchestration.lineage import latest_metadata
from orchestration.resources import CurationResource, K5HomeResource

# What `make demo` runs: main_job with simulated annotators (accounts "simulated:*", labelled as such everywhere).
DEMO_SFT_RUN_CONFIG = {"ops": {"sft_judgments": {"config": {
    "simulate": True, "simulated_screening_shift": 2.0, "simulated_expert_leniency": 0.5,  # a small corpus
    "regular_annotators": [f"{SIMULATED_PREFIX}screener_{k:02d}" for k in range(1, 3)],
    "experts": [f"{SIMULATED_PREFIX}expert_{k:02d}" for k in range(1, 5)]}}}}


class SftJudgmentsConfig(dg.Config):
    regular_annotators: list[str] = Field(default_factory=lambda: ["screener_01", "screener_02"],
                                          description="Stage 1 (technical screening) accounts")
    experts: list[str] = Field(default_factory=lambda: [f"expert_{k:02d}" for k in range(1, 5)],
                               description="Stage 2 (expert questionnaire) accounts")
    stage1_overlap: int = Field(1, description="regular annotators screening each item")
    stage1_min_yes: float = Field(0.5, description="share of screeners answering yes to every question to pass")
    expert_overlap: int = Field(3, description="experts per item that passed Stage 1 (report rule needs >= 3)")
    max_items: int = Field(200, description="items taken from the curated dataset, best aesthetic score first")
    simulate: bool = Field(False, description="demo/tests: fill the queues of the 'simulated:*' accounts")
    seed: int = Field(0, description="seed of the simulated annotators")
    simulated_screening_shift: float = Field(1.0, description="simulated screeners' leniency (higher: more pass)")
    simulated_expert_leniency: float = Field(0.1, description="simulated experts' leniency (higher: more 'good')")


class SftConsensusConfig(dg.Config):
    v1_min_experts: int = Field(3, description="v1: experts who answered every criterion")
    v1_min_good: float = Field(2 / 3, description="v1: share of 'good' each criterion needs (report: 2 of 3)")
    v2_min_experts: int = Field(2, description="v2: experts needed")
    v2_min_good: float = Field(0.5, description="v2: share of 'good' a criterion needs to pass")
    v2_max_failed_criteria: int = Field(2, description="v2: criteria allowed below v2_min_good")


class SftMixConfig(dg.Config):
    p_v1: float | None = Field(None, description="probability a sample comes from v1; unset: from v1_upweight")
    v1_upweight: float = Field(3.0, description="a v1 row is drawn this many times as often as a v2-only row")


def sft_dir(home: K5HomeResource) -> Path:
    return home.paths.home / "sft"


@dg.asset(deps=[curated_dataset], group_name="sft_data", kinds={"duckdb"})
def sft_judgments(context: dg.AssetExecutionContext, config: SftJudgmentsConfig, k5_home: K5HomeResource,
                  curation: CurationResource) -> dg.MaterializeResult:
    """The SFT annotation batch (curated passed rows, Stage 1 queue) and its judgments store."""
    curated = read_dataset(str(latest_metadata(context, curated_dataset.key)["path"]), curation.config())
    batch = SftBatchConfig(**config.model_dump(exclude={"simulate", "seed", "simulated_screening_shift",
                                                        "simulated_expert_leniency"}))
    sim = SimulatedRaters(seed=config.seed, screening_pass_rate_shift=config.simulated_screening_shift,
                          expert_leniency=config.simulated_expert_leniency)
    store = SftStore(sft_dir(k5_home) / "judgments.duckdb")
    summary = prepare_batch(store, curated, sft_dir(k5_home) / "media", batch,
                            sim if config.simulate else None, curation.endpoint_url)
    context.log.info(f"SFT batch in {store.path}: {summary}")
    return dg.MaterializeResult(metadata={**summary, "store_path": store.path})


@dg.multi_asset(specs=[
    dg.AssetSpec("sft_v1", deps=[sft_judgments], group_name="sft_data", kinds={"parquet"},
                 description="SFT v1: strict consensus ('good' by >= 2 of 3 experts on every criterion)"),
    dg.AssetSpec("sft_v2", deps=[sft_judgments], group_name="sft_data", kinds={"parquet"},
                 description="SFT v2: items meeting the relaxed thresholds (v1 ⊆ v2)")])
def sft_versions(context: dg.AssetExecutionContext, config: SftConsensusConfig, k5_home: K5HomeResource):
    """Consensus of the expert questionnaires -> v1.parquet and v2.parquet, agreement per criterion."""
    store = SftStore(sft_dir(k5_home) / "judgments.duckdb")
    out = build_versions(store, ConsensusConfig(**config.model_dump()), sft_dir(k5_home) / "datasets")
    for version in ("v1", "v2"):
        meta = out[version]
        alpha = "| criterion | stage | Krippendorff alpha | items |\n|---|---|---|---|\n" + "".join(
            f"| {k} | {v['stage']} | {v['alpha']} | {v['items']} |\n" for k, v in meta["agreement"].items())
        yield dg.MaterializeResult(asset_key=f"sft_{version}", metadata={
            "path": meta["path"], "rows": meta["rows"], "images": meta["images"], "videos": meta["videos"],
            "domains": dg.MetadataValue.json(meta["domains"]), "agreement": dg.MetadataValue.json(meta["agreement"]),
            "agreement_table": dg.MetadataValue.md(alpha), "progress": dg.MetadataValue.json(meta["progress"]),
            "thresholds": dg.MetadataValue.json(meta["thresholds"])})


@dg.asset(deps=["sft_v1", "sft_v2"], group_name="sft_data", kinds={"parquet"})
def sft_mix(context: dg.AssetExecutionContext, config: SftMixConfig, k5_home: K5HomeResource) -> dg.MaterializeResult:
    """v1 ∪ v2 with a per-row sampling probability (v1 vs v2-only mixed with calibrated probabilities)."""
    table = read_sft_dataset(latest_metadata(context, "sft_v2")["path"])  # v1 ⊆ v2; rows carry in_v1
    path, info = write_mix(table, MixConfig(**config.model_dump()), sft_dir(k5_home) / "datasets")
    return dg.MaterializeResult(metadata={"path": str(path), "rows": int(info["v1_rows"] + info["v2_only_rows"]),
                                          **{k: float(v) for k, v in info.items()}})


def _frame(context: dg.AssetCheckExecutionContext, key: str) -> pd.DataFrame:
    return read_sft_dataset(str(latest_metadata(context, key)["path"]))


@dg.asset_check(asset="sft_v1", description="v1 ⊆ v2: every v1 item is in the latest v2 dataset.")
def sft_v1_within_v2(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    missing = sorted(set(_frame(context, "sft_v1")["item_id"]) - set(_frame(context, "sft_v2")["item_id"]))
    return dg.AssetCheckResult(passed=not missing, metadata={"v1_items_not_in_v2": len(missing),
                                                             "examples": dg.MetadataValue.json(missing[:10])})


@dg.asset_check(asset="sft_v2", description="Every dataset row is re-derived from the store with the thresholds it "
                                            "was built with: v1/v2 membership matches the consensus rule.")
def sft_membership_follows_thresholds(context: dg.AssetCheckExecutionContext,
                                      k5_home: K5HomeResource) -> dg.AssetCheckResult:
    cfg = ConsensusConfig(**latest_metadata(context, "sft_v2")["thresholds"])
    store = SftStore(sft_dir(k5_home) / "judgments.duckdb")
    expected = item_consensus(store.items_frame(), store.answers_frame(stage=2), cfg).set_index("item_id")
    wrong = []
    for version in ("v1", "v2"):
        got = set(_frame(context, f"sft_{version}")["item_id"])
        want = set(expected.index[expected[f"in_{version}"]])
        wrong += [f"{version}:{i}" for i in sorted(got ^ want)]
    return dg.AssetCheckResult(passed=not wrong, metadata={"mismatches": len(wrong),
                                                           "examples": dg.MetadataValue.json(wrong[:10])})


@dg.asset_check(asset=sft_mix, description="Sampling probabilities are >= 0, sum to 1, and give v1 the recorded share.")
def sft_mix_probabilities(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    meta = latest_metadata(context, sft_mix.key)
    mix = _frame(context, "sft_mix")
    total, v1_share = float(mix["sample_prob"].sum()), float(mix.loc[mix["in_v1"], "sample_prob"].sum())
    ok = mix.empty or ((mix["sample_prob"] >= 0).all() and abs(total - 1) < 1e-9
                       and abs(v1_share - float(meta["p_v1"])) < 1e-9)
    return dg.AssetCheckResult(passed=bool(ok), metadata={"sum": total, "v1_share": v1_share,
                                                          "p_v1": float(meta["p_v1"])})

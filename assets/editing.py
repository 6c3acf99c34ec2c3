"""Editing-pair mining assets (report §4.3, Table 1): ``curated_dataset -> edit_candidates -> edit_pairs``. The
work is in ``k5data.editing``; ``k5 edit-pairs`` runs the same functions from the same ``EditMiningConfig``."""

# No `from __future__ import annotations`: Dagster resolves the Config classes from live annotations.
import dagster as dg
from pydantic import Field

from assets.curation import curated_dataset
from k5data.curation.output import read_dataset
from k5data.editing.config import load_mining_config
from k5data.editing.pairs import mine_candidates, mine_pairs
from orchestration.lineage import latest_metadata
from orchestration.resources import CurationResource, ObjectStoreResource


class EditMiningRunConfig(dg.Config):
    config_path: str | None = Field(None, description="YAML of EditMiningConfig fields (k5data/editing/config.py); "
                                    "unset: offline thumbnail features, SIFT, caption-diff instructions")


def _table(counts: dict[str, int], what: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"| {what} | pairs |\n|---|---|\n" + "".join(f"| {k} | {v} |\n"
                                                                        for k, v in counts.items()))


@dg.asset(deps=[curated_dataset], group_name="editing", kinds={"parquet", "faiss"})
def edit_candidates(context: dg.AssetExecutionContext, config: EditMiningRunConfig, curation: CurationResource,
                    object_store: ObjectStoreResource) -> dg.MaterializeResult:
    """Candidate pairs of the curated images: nearest neighbours in CLIP and DINO HNSW indexes (never all pairs),
    their CLIP / DINO / face similarities and per-cluster CLIP thresholds."""
    cur = curation.config()
    curated = read_dataset(str(latest_metadata(context, curated_dataset.key)["path"]), cur)
    s = mine_candidates(curated, object_store.store(), load_mining_config(config.config_path), cur.endpoint_url)
    context.log.info(f"edit candidates: {s}")
    return dg.MaterializeResult(metadata={k: s[k] for k in ("path", "uri", "images", "candidates", "all_pairs",
                                                            "distance_evaluations", "clusters", "embedders",
                                                            "faces")})


@dg.asset(deps=[edit_candidates], group_name="editing", kinds={"parquet"})
def edit_pairs(context: dg.AssetExecutionContext, config: EditMiningRunConfig, curation: CurationResource,
               object_store: ObjectStoreResource) -> dg.MaterializeResult:
    """Geometric verification, aligned DINO, overlap analysis, the Table 1 decision with its rule or drop reason,
    instructions of kept pairs and the SFT flag: one Parquet row per candidate (``read_edit_pairs``)."""
    candidates = str(latest_metadata(context, edit_candidates.key)["path"])
    s = mine_pairs(object_store.store(), load_mining_config(config.config_path), candidates,
                   curation.config().endpoint_url)
    context.log.info(f"edit pairs: {s}")
    return dg.MaterializeResult(metadata={
        **{k: s[k] for k in ("path", "uri", "pairs", "kept", "dropped", "sft", "matcher", "instructions")},
        "drop_reasons": _table(s["drop_reasons"], "drop reason"), "kept_by_rule": _table(s["kept_by_rule"], "rule"),
        "drop_histogram": dg.MetadataValue.json(s["drop_reasons"]),
        "rule_histogram": dg.MetadataValue.json(s["kept_by_rule"])})

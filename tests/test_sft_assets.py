"""SFT dataset assets in Dagster (in-process, real DuckDB/Parquet): a curated dataset in the real layout ->
``sft_judgments`` (simulated annotators) -> ``sft_v1``/``sft_v2`` -> ``sft_mix`` with their checks, and each check
deciding both ways on a tampered output."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from helpers import write_curated_dataset

from assets.sft_data import (
    DEMO_SFT_RUN_CONFIG,
    sft_judgments,
    sft_membership_follows_thresholds,
    sft_mix,
    sft_mix_probabilities,
    sft_v1_within_v2,
    sft_versions,
)
from k5data.curation.config import load_config
from k5data.curation.output import read_dataset, write_outputs
from orchestration.resources import CurationResource, K5HomeResource

pytestmark = pytest.mark.slow  # Dagster runs on an 18-item batch with simulated annotators: tens of seconds

ASSETS = [sft_judgments, sft_versions, sft_mix, sft_v1_within_v2, sft_membership_follows_thresholds,
          sft_mix_probabilities]


@pytest.fixture(scope="module")
def materialized(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sft_assets")
    # six small datasets' rows in one (18 passed rows), so the seeded consensus has something to split
    parts = [read_dataset(str(write_curated_dataset(root / f"part{k}", f"_{k}")), load_config()) for k in range(6)]
    write_outputs(pd.concat(parts, ignore_index=True).to_dict("records"), [], str(root / "curated"), load_config())
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(dg.AssetMaterialization("curated_dataset",
                                                                metadata={"path": str(root / "curated")}))
    resources = {"k5_home": K5HomeResource(home=str(root / "home")), "curation": CurationResource()}
    result = dg.materialize(ASSETS, instance=instance, resources=resources, run_config=DEMO_SFT_RUN_CONFIG)
    return {"result": result, "instance": instance, "resources": resources, "home": root / "home"}


def test_lineage_materializes_with_checks(materialized) -> None:
    result = materialized["result"]
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())
    judged = result.asset_materializations_for_node("sft_judgments")[0].metadata
    assert judged["items"].value == 18 and judged["simulated"].value is True  # the passed curated rows
    v1 = {e.asset_key.to_user_string(): e.metadata for e in result.asset_materializations_for_node("sft_versions")}
    n1, n2 = v1["sft_v1"]["rows"].value, v1["sft_v2"]["rows"].value
    assert 0 < n1 <= n2 < judged["items"].value
    agreement = v1["sft_v1"]["agreement"].value
    assert "main_object" in agreement and "img_wow_factor" in agreement and "vid_aesthetics" in agreement
    mix = result.asset_materializations_for_node("sft_mix")[0].metadata
    assert mix["rows"].value == n2 and Path(mix["path"].value).is_file()
    df = pd.read_parquet(v1["sft_v1"]["path"].value)
    assert set(df["item_id"]) <= set(pd.read_parquet(v1["sft_v2"]["path"].value)["item_id"])
    assert all(Path(p).is_file() for p in df["media_path"])


def run_checks(materialized) -> dict[str, bool]:
    result = dg.materialize(ASSETS, instance=materialized["instance"], resources=materialized["resources"],
                            selection=dg.AssetSelection.checks(sft_v1_within_v2, sft_membership_follows_thresholds,
                                                               sft_mix_probabilities),
                            raise_on_error=False)
    return {c.check_name: c.passed for c in result.get_asset_check_evaluations()}


def test_checks_decide_both_ways(materialized) -> None:
    datasets = materialized["home"] / "sft" / "datasets"
    assert run_checks(materialized) == {"sft_v1_within_v2": True, "sft_membership_follows_thresholds": True,
                                        "sft_mix_probabilities": True}
    v1, v2, mix = (pd.read_parquet(datasets / f"{n}.parquet") for n in ("v1", "v2", "mix"))
    try:  # a v1 item missing from v2, and probabilities that no longer sum to 1
        v2.loc[v2["item_id"] != v1["item_id"].iloc[0]].to_parquet(datasets / "v2.parquet")
        mix.assign(sample_prob=mix["sample_prob"] * 2).to_parquet(datasets / "mix.parquet")
        assert run_checks(materialized) == {"sft_v1_within_v2": False, "sft_membership_follows_thresholds": False,
                                            "sft_mix_probabilities": False}
    finally:
        v2.to_parquet(datasets / "v2.parquet")
        mix.to_parquet(datasets / "mix.parquet")

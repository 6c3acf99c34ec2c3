"""Curation assets in Dagster: shard partitions, the dataset asset, its checks and metadata (images-only corpus)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from assets import curation as cur
from k5data.curation.corpus import build_sample_corpus
from k5data.curation.output import current_version, read_dataset
from orchestration.resources import CurationResource, K5HomeResource, ObjectStoreResource


@pytest.fixture(scope="module")
def materialized(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dagster_curation")
    corpus = build_sample_corpus(root / "corpus", videos=False)
    resources = {"k5_home": K5HomeResource(home=str(root / "home")),
                 "object_store": ObjectStoreResource(base_uri=str(root / "objects")),
                 "curation": CurationResource(source=str(corpus))}
    instance = dg.DagsterInstance.ephemeral()
    shard_results = []
    for key in cur.SHARDS.get_partition_keys():
        shard_results.append(dg.materialize([cur.raw_sources, cur.scored_scenes], partition_key=key,
                                            resources=resources, instance=instance))
    final = dg.materialize([cur.raw_sources, cur.scored_scenes, cur.curated_dataset, *cur.CURATION_CHECKS],
                           selection=dg.AssetSelection.assets(cur.curated_dataset), resources=resources,
                           instance=instance)
    return {"root": root, "shards": shard_results, "final": final, "instance": instance, "resources": resources}


def test_shards_register_every_file_once(materialized: dict) -> None:
    listed = new = quarantined = 0
    for result in materialized["shards"]:
        assert result.success
        (mat,) = [m for m in result.asset_materializations_for_node("raw_sources")]
        listed += mat.metadata["listed"].value
        new += mat.metadata["new_media"].value
        quarantined += mat.metadata["quarantined"].value
    # 8 photos + 3 derived images + 5 editing cases; empty, truncated, mislabelled and unsupported files are
    # quarantined.
    assert (listed, new, quarantined) == (20, 16, 4)


def test_dataset_metadata_and_checks(materialized: dict) -> None:
    result = materialized["final"]
    assert result.success
    (mat,) = result.asset_materializations_for_node("curated_dataset")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["rows"] == 16 and meta["images"] == 16 and meta["quarantined"] == 4  # 11 photos + 5 editing cases
    assert meta["reject_histogram"]["duplicate"] >= 2  # re-encoded coffee, resized china (+ overlay astronaut)
    assert "| duplicate |" in meta["reject_reasons"]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"no_duplicate_hashes": True, "passed_rows_captioned": True, "bucket_counts_sane": True}
    path = Path(meta["path"])
    assert path == materialized["root"] / "objects" / "curation"
    assert (path / "CURRENT.json").is_file() and list((path / "versions").rglob("*.parquet"))


def test_materialize_helper_reruns_cleanly(materialized: dict) -> None:
    """The demo helper over every shard: a second pass registers nothing new and every check passes."""
    assert cur.materialize_curation(materialized["instance"], materialized["resources"]) is True
    event = materialized["instance"].get_latest_materialization_event(dg.AssetKey("raw_sources"))
    assert event.asset_materialization.metadata["new_media"].value == 0


def test_check_fails_on_a_bad_dataset(materialized: dict) -> None:
    """The captioned check is not vacuous: blank a passed row's caption in the written Parquet and it fails."""
    import pandas as pd

    from k5data.curation.config import load_config

    out = materialized["root"] / "objects" / "curation"
    df = read_dataset(str(out), load_config())
    victim = df[df["passed"]].iloc[0]
    part = out / next(k for k in current_version(str(out), load_config())["dataset"]
                      if k.endswith(f"/{victim['bucket']}/{victim['source']}/part-00000.parquet"))
    frame = pd.read_parquet(part)
    frame.loc[frame["media_id"] == victim["media_id"], "caption"] = ""
    frame.to_parquet(part, index=False)
    result = dg.materialize([cur.curated_dataset, cur.passed_rows_captioned],
                            selection=dg.AssetSelection.checks(cur.passed_rows_captioned),
                            resources=materialized["resources"], instance=materialized["instance"],
                            raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.passed is False and evaluation.metadata["uncaptioned"].value == 1

"""Data curation assets (report §4): ``raw_sources`` -> ``scored_scenes`` (both partitioned by source shard, so a
large corpus runs as parallel runs / a backfill, on a distributed executor in production) -> ``curated_dataset``
(global dedup, clusters, Parquet in the object store) with asset checks. All work is in ``k5data``."""

# No `from __future__ import annotations`: Dagster inspects the real `context` type hints at definition time.
from typing import Any

import dagster as dg

from k5data.curation.catalog import Catalog
from k5data.curation.checks import CheckOutcome, bucket_sanity, duplicate_hashes, uncaptioned_rows
from k5data.curation.config import load_config
from k5data.curation.curate import finalize
from k5data.curation.output import read_dataset
from k5data.curation.register import RegisterStats
from orchestration.lineage import latest_metadata
from orchestration.resources import CurationResource, K5HomeResource, ObjectStoreResource

OBJECT_PREFIX = "curation"
SHARDS = dg.StaticPartitionsDefinition([str(i) for i in range(load_config()["shards"])])


def _catalog(home: K5HomeResource) -> Catalog:
    return Catalog(home.paths.catalog_db)


@dg.asset(partitions_def=SHARDS, group_name="curation", kinds={"duckdb"})
def raw_sources(context: dg.AssetExecutionContext, k5_home: K5HomeResource,
                curation: CurationResource) -> dg.MaterializeResult:
    """Register the shard's images and videos into the DuckDB catalog by content hash; bad files -> quarantine."""
    shard = int(context.partition_key)
    source = curation.open_source(k5_home)
    stats = RegisterStats(**curation.run_shard_step(k5_home, "register", shard))  # here, or a Ray task
    context.log.info(f"shard {shard} of {source.root}: {stats}")
    return dg.MaterializeResult(metadata={
        "source": source.root, "listed": stats.listed, "new_media": stats.new_media, "new_copies": stats.new_copies,
        "unchanged": stats.unchanged, "quarantined": stats.quarantined,
        "quarantine_reasons": dg.MetadataValue.json(stats.reasons)})


@dg.asset(partitions_def=SHARDS, deps=[raw_sources], group_name="curation", kinds={"duckdb"})
def scored_scenes(context: dg.AssetExecutionContext, k5_home: K5HomeResource,
                  curation: CurationResource) -> dg.MaterializeResult:
    """Scene segmentation and every per-row filter, caption, domain and embedding for the shard's new media."""
    shard = int(context.partition_key)
    counts = curation.run_shard_step(k5_home, "score", shard)  # in this process, or a Ray task (ray_address)
    return dg.MaterializeResult(metadata={k: counts[k] for k in ("scored_media", "rows", "errors")})


@dg.asset(deps=[scored_scenes], group_name="curation", kinds={"parquet"})
def curated_dataset(context: dg.AssetExecutionContext, k5_home: K5HomeResource, curation: CurationResource,
                    object_store: ObjectStoreResource) -> dg.MaterializeResult:
    """Parquet dataset by short-side bucket and source (one row per image / scene) + quarantine table, published
    as a new version that CURRENT.json switches to (``k5data.curation.output.write_outputs``)."""
    # The dataset "folder" is the store prefix holding CURRENT.json and versions/ (or curation.out itself).
    out = curation.out or object_store.store().child(OBJECT_PREFIX)
    summary, _ = finalize(_catalog(k5_home), out, curation.config())
    path = out if isinstance(out, str) else out.location
    context.log.info(f"curated dataset at {path}: {summary}")
    hist = summary["reject_reasons"]
    table = "| reason | rows |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in hist.items())
    return dg.MaterializeResult(metadata={
        "path": path, "rows": summary["rows"], "images": summary["images"], "scenes": summary["scenes"],
        "passed": summary["passed"], "rejected": summary["rejected"], "quarantined": summary["quarantined"],
        "reject_reasons": dg.MetadataValue.md(table), "reject_histogram": dg.MetadataValue.json(hist),
        "buckets": dg.MetadataValue.json(summary["buckets"]), "domains": dg.MetadataValue.json(summary["domains"])})


def _dataset(context: dg.AssetCheckExecutionContext, curation: CurationResource) -> Any:
    return read_dataset(str(latest_metadata(context, curated_dataset.key)["path"]), curation.config())


def _result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=outcome.passed, metadata=outcome.metadata)


@dg.asset_check(asset=curated_dataset, description="No two passed rows share a content hash or perceptual hash.")
def no_duplicate_hashes(context: dg.AssetCheckExecutionContext, curation: CurationResource) -> dg.AssetCheckResult:
    return _result(duplicate_hashes(_dataset(context, curation)))


@dg.asset_check(asset=curated_dataset, description="Every passed row has a non-empty caption.")
def passed_rows_captioned(context: dg.AssetCheckExecutionContext,
                          curation: CurationResource) -> dg.AssetCheckResult:
    return _result(uncaptioned_rows(_dataset(context, curation)))


@dg.asset_check(asset=curated_dataset, description="Buckets are 256/512/1024 for passed rows, match the short side, "
                                                  "and the dataset is not empty.")
def bucket_counts_sane(context: dg.AssetCheckExecutionContext, curation: CurationResource) -> dg.AssetCheckResult:
    return _result(bucket_sanity(_dataset(context, curation), curation.config()["buckets"]))


CURATION_CHECKS = [no_duplicate_hashes, passed_rows_captioned, bucket_counts_sane]


def materialize_curation(instance: dg.DagsterInstance, resources: dict[str, Any]) -> bool:
    """Demo / backfill helper: every shard partition of ``raw_sources`` + ``scored_scenes`` (one run each: on a
    cluster these are parallel runs), then ``curated_dataset`` and its checks. True if everything passed."""
    everything = [raw_sources, scored_scenes, curated_dataset, *CURATION_CHECKS]
    ok = True
    for key in SHARDS.get_partition_keys():
        result = dg.materialize(everything, selection=dg.AssetSelection.assets(raw_sources, scored_scenes),
                                partition_key=key, resources=resources, instance=instance, raise_on_error=False)
        ok &= result.success
    result = dg.materialize(everything, selection=dg.AssetSelection.assets(curated_dataset), resources=resources,
                            instance=instance, raise_on_error=False)
    return ok and result.success and all(e.passed for e in result.get_asset_check_evaluations())

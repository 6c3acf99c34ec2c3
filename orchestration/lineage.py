"""Lineage look-ups shared by every asset: what an upstream asset recorded when it was last materialized, and where
a trained stage's pipeline lives. Lineage goes through the recorded event, not a path recomputed downstream, so an
upstream materialized elsewhere (another K5_HOME, a registry) is what a downstream asset loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from orchestration.settings import K5Paths

Context = dg.AssetExecutionContext | dg.AssetCheckExecutionContext | dg.OpExecutionContext


def latest_metadata(context: Context, key: dg.AssetKey | str, partition: str | None = None) -> dict[str, Any]:
    """Metadata values of ``key``'s latest materialization (of ``partition`` when given).

    Raises ``dg.Failure`` naming the asset to materialize when there is none."""
    key = dg.AssetKey(key) if isinstance(key, str) else key
    instance = context.instance
    if partition is None:
        event = instance.get_latest_materialization_event(key)
        materialization = None if event is None else event.asset_materialization
    else:
        found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]),
                                                limit=1)
        materialization = found.records[0].asset_materialization if found.records else None
    if materialization is None:
        where = f" (partition {partition!r})" if partition else ""
        raise dg.Failure(f"asset {key.to_user_string()}{where} has never been materialized; materialize it first")
    return {k: v.value for k, v in materialization.metadata.items()}


def upstream_path(context: Context, key: dg.AssetKey | str, field: str = "path") -> Path:
    """The path an upstream asset recorded under ``field`` in its latest materialization."""
    meta = latest_metadata(context, key)
    if field not in meta:
        raise dg.Failure(f"asset {key} recorded no {field!r} in its latest materialization; materialize it again")
    return Path(str(meta[field]))


def stage_dir(paths: K5Paths, stage: str) -> Path:
    """Run folder of a training stage: checkpoints, metrics, and the published ``pipeline/``."""
    return paths.models / "training" / stage


def stage_pipeline_dir(paths: K5Paths, stage: str) -> Path:
    """The complete diffusers pipeline folder a finished stage publishes (transformer + linked frozen parts)."""
    return stage_dir(paths, stage) / "pipeline"

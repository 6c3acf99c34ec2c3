"""``k5 curate SRC OUT``: curate a folder or S3 prefix into a new dataset version under OUT (Parquet by bucket and
source + quarantine table), switched in by OUT/CURRENT.json.

Also runnable as ``python -m k5cli.curate SRC OUT``."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("curate")
@click.argument("src")
@click.argument("out")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML merged over k5data/curation/configs/curation.yaml (thresholds, backends, model paths); "
                   "k5data/curation/configs/production.yaml runs every filter on a local model (docs/curation.md).")
@click.option("--catalog", "catalog_path", default=None, help="DuckDB catalog file (default: OUT/catalog.duckdb).")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// SRC/OUT (overrides config).")
@click.option("--captioner", "captioner_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local Qwen2.5-VL folder that captions media without a sidecar (sets captions.backend: qwen2_5_vl "
                   "and captions.model_path).")
@click.option("--shard", type=int, default=None, help="Only register/score this source shard (0..shards-1).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def curate(src: str, out: str, config_path: str | None, catalog_path: str | None, endpoint_url: str | None,
           captioner_path: str | None, shard: int | None, no_progress: bool, as_json: bool) -> None:
    """Curate SRC (folder or s3://bucket/prefix) into OUT (folder or s3://bucket/prefix)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # production backends load local folders only
    from k5data.curation.config import load_config
    from k5data.curation.curate import run_curation

    overrides: dict = {"s3": {"endpoint_url": endpoint_url}} if endpoint_url else {}
    if captioner_path:
        overrides["captions"] = {"backend": "qwen2_5_vl", "model_path": str(Path(captioner_path).resolve())}
    cfg = load_config(config_path, overrides)
    if shard is not None and not 0 <= shard < cfg["shards"]:
        raise click.BadParameter(f"shard must be in 0..{cfg['shards'] - 1}", param_hint="--shard")
    from k5data.curation.captions import MissingCaptioner
    from k5data.leases import LeaseHeld
    from k5data.object_store import TransientStoreError, is_transient

    try:
        summary = run_curation(src, out, cfg, catalog_path=catalog_path, shard=shard, progress=not no_progress)
    # retries spent / another writer / media no caption could reach: one line, exit 1
    except (TransientStoreError, LeaseHeld, MissingCaptioner) as err:
        raise click.ClickException(str(err)) from None
    except Exception as err:
        if not is_transient(err):
            raise
        # a local condition (disk full, permissions) while writing the dataset or the catalog
        raise click.ClickException(f"{type(err).__name__}: {' '.join(str(err).split())} - a condition, not a bad "
                                   "file: nothing was quarantined or marked done; fix it and re-run") from None
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, default=str))
        return
    reg, ds = summary.register, summary.dataset
    click.echo(f"registered: {reg['new_media']} new media, {reg['new_copies']} new copies, "
               f"{reg['unchanged']} unchanged, {reg['quarantined']} quarantined, {reg['retired']} retired (gone), "
               f"{reg['recaptioned']} with a changed caption file")
    click.echo(f"scored: {summary.scored_media} media -> {summary.scored_rows} rows "
               f"({summary.scoring_errors} errors) in {summary.seconds:.1f} s")
    click.echo(f"dataset: {ds['rows']} rows ({ds['images']} images, {ds['scenes']} scenes), {ds['passed']} passed, "
               f"{ds['rejected']} rejected, {ds['quarantined']} quarantined")
    click.echo("buckets (passed): " + (", ".join(f"{k}: {v}" for k, v in ds["buckets"].items()) or "none"))
    click.echo("reject reasons: " + (", ".join(f"{k}: {v}" for k, v in ds["reject_reasons"].items()) or "none"))
    click.echo(f"wrote {len(summary.written)} files under {out}")


def main() -> None:
    curate()


if __name__ == "__main__":
    main()

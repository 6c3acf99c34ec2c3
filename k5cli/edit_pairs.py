"""``k5 edit-pairs CURATED OUT``: the editing-pair mining of the ``edit_candidates`` / ``edit_pairs`` assets
(``k5data.editing``) on a curated dataset, writing ``editing/edit_candidates.parquet`` and
``editing/edit_pairs.parquet`` under OUT (a folder or ``s3://`` prefix)."""

from __future__ import annotations

import json

import click


@click.command("edit-pairs")
@click.argument("curated")
@click.argument("out")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="YAML of EditMiningConfig fields (k5data/editing/config.py); default: offline features, SIFT.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs (or $K5_S3_ENDPOINT_URL).")
def edit_pairs(curated: str, out: str, config_path: str | None, endpoint_url: str | None) -> None:
    """Mine editing pairs (report §4.3, Table 1) from the curated dataset CURATED (folder or s3:// prefix) into OUT;
    prints the candidate and pair summaries as JSON."""
    from k5cli.main import K5Error
    from k5data.curation.config import load_config
    from k5data.curation.output import read_dataset
    from k5data.editing.config import load_mining_config
    from k5data.editing.pairs import mine_candidates, mine_pairs
    from k5data.object_store import open_store

    try:
        cfg = load_mining_config(config_path)
        cur = load_config(None, {"s3": {"endpoint_url": endpoint_url}} if endpoint_url else None)
        curated_rows = read_dataset(curated, cur)
        store = open_store(out, cur.endpoint_url)
        candidates = mine_candidates(curated_rows, store, cfg, cur.endpoint_url)
        click.echo(json.dumps({"edit_candidates": candidates}, default=str))
        pairs = mine_pairs(store, cfg, candidates["path"], cur.endpoint_url)
        click.echo(json.dumps({"edit_pairs": pairs}, default=str))
    except (FileNotFoundError, ValueError) as exc:
        raise K5Error(str(exc)) from exc

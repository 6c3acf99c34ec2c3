"""End-to-end curation of one folder or S3 prefix: register -> score -> dataset Parquet + quarantine.parquet.

The CLI calls ``run_curation``; the Dagster assets call its three stages (``register_sources``, ``score_pending``,
``finalize``) per source shard and once for the dataset."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k5data.curation.captions import MissingCaptioner, has_captioner, sidecar_key, uncaptioned_message
from k5data.curation.catalog import Catalog
from k5data.curation.config import CurationConfig, load_config
from k5data.curation.output import build_rows, summarize, write_outputs
from k5data.curation.register import RegisterStats, register_sources
from k5data.curation.score import Scorers, score_media
from k5data.object_store import ObjectStore, TransientStoreError, with_retries
from k5data.sources import Source, is_s3

if TYPE_CHECKING:
    from k5data.curation.ray_exec import ShardExecutor


@dataclass
class CurationSummary:
    register: dict[str, Any]
    scored_media: int
    scored_rows: int
    scoring_errors: int
    dataset: dict[str, Any]
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_catalog_path(out: str) -> Path:
    """Local outputs keep their catalog beside the dataset; S3 outputs keep it in a local cache folder."""
    if is_s3(out):
        safe = out[len("s3://"):].replace("/", "_")
        return Path(os.environ.get("K5_CACHE", Path.home() / ".cache" / "k5")) / "catalogs" / f"{safe}.duckdb"
    return Path(out) / "catalog.duckdb"


def _bar(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=not enabled, leave=True, dynamic_ncols=True)


def check_captions(pending: list[dict[str, Any]], source: Source, catalog: Catalog, cfg: CurationConfig) -> None:
    """With ``captions.require`` and no captioner model, media without a sidecar can only be rejected as
    ``no_caption``. When the source lists NO sidecar at all (a folder of plain photos) raise ``MissingCaptioner``
    with one line naming the config keys, before any scoring; when it has sidecars but some ``pending`` media lack
    one, log that line as a warning and go on (a partly captioned folder is normal while captions are written)."""
    captions = cfg.section("captions")
    if not pending or not captions["require"] or has_captioner(captions):
        return
    sidecars = catalog.sidecar_keys(source.name)
    missing = sum(sidecar_key(media["key"]) not in sidecars for media in pending)
    if not missing:
        return
    line = uncaptioned_message(missing, len(pending), source.root)
    if not sidecars:
        raise MissingCaptioner(line)
    logging.getLogger(__name__).warning(line)


def score_pending(source: Source, catalog: Catalog, cfg: CurationConfig, shard: int | None = None,
                  progress: bool = False) -> tuple[int, int, int]:
    """Score every registered but unscored media file of ``source`` (one shard when given).

    Returns (media scored, rows produced, media that failed). A media file that fails here for a reason of its
    own (say, a decoder error past the probe) moves to quarantine with the reason and the run goes on; a transient
    error (store unreachable, throttling, permissions) is retried, then raises ``TransientStoreError`` and leaves
    the media unscored, so a later run scores it. A media file is marked scored only together with its rows.
    Before anything is scored, ``check_captions`` refuses a batch that no caption could reach."""
    pending = catalog.unscored(source.name, shard)
    check_captions(pending, source, catalog, cfg)
    scorers = Scorers(cfg) if pending else None
    media_n = rows_n = errors = 0
    with _bar(len(pending), "scoring", progress) as bar:
        for media in pending:
            bar.set_postfix_str(media["key"][-40:])
            try:
                rows_n += len(with_retries(lambda media=media: score_media(media, source, catalog, cfg, scorers),
                                           operation="scoring", target=media["source_uri"],
                                           policy=cfg.retry_policy))
                media_n += 1
            except TransientStoreError:
                raise
            except Exception as err:
                errors += 1
                catalog.quarantine_media(media["media_id"], f"scoring failed: {type(err).__name__}: {err}")
            bar.update(1)
    return media_n, rows_n, errors


def finalize(catalog: Catalog, out: str | ObjectStore, cfg: CurationConfig) -> tuple[dict[str, Any], list[str]]:
    """Build the final rows from the whole catalog and write the dataset to ``out`` (folder, ``s3://`` prefix or
    store); returns (summary counts, written URIs)."""
    rows = build_rows(catalog.items(), cfg)
    quarantine = catalog.quarantined()
    return summarize(rows, quarantine), write_outputs(rows, quarantine, out, cfg)


def run_curation(src: str, out: str, cfg: CurationConfig | None = None, *, catalog_path: str | None = None,
                 shard: int | None = None, progress: bool = True,
                 executor: ShardExecutor | None = None) -> CurationSummary:
    """Curate ``src`` (folder or s3://bucket/prefix) into ``out`` (folder or s3://...). Re-runs only add new files.
    With ``executor``, registration and scoring run per shard on it (one call per shard and step)."""
    start = time.perf_counter()
    cfg = cfg or load_config()
    s3 = cfg.section("s3")
    source = Source(src, cfg.endpoint_url, s3["region"], retry=cfg.retry_policy)
    catalog = Catalog(catalog_path or default_catalog_path(out))
    if executor is not None:
        from k5data.curation.ray_exec import register_and_score

        stats, media_n, rows_n, errors = register_and_score(executor, src, catalog.path, cfg, shard)
    else:
        with _bar(None, "registering", progress) as bar:
            stats: RegisterStats = register_sources(source, catalog, cfg, shard, progress=bar)
        media_n, rows_n, errors = score_pending(source, catalog, cfg, shard, progress)
    dataset, written = finalize(catalog, out, cfg)
    return CurationSummary(asdict(stats), media_n, rows_n, errors, dataset, written, time.perf_counter() - start)

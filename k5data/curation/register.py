"""``raw_sources``: register a folder / S3 prefix into the catalog by content hash; bad files go to quarantine."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from k5data.curation.captions import sidecar_key
from k5data.curation.catalog import PERMANENT, Catalog
from k5data.curation.config import CurationConfig
from k5data.curation.probe import ProbeError, probe_file
from k5data.object_store import is_transient, with_retries
from k5data.sources import Source, SourceObject, shard_of


@dataclass
class RegisterStats:
    listed: int = 0
    new_media: int = 0       # new content hashes
    new_copies: int = 0      # new locations of content already in the catalog (exact byte duplicates)
    quarantined: int = 0
    unchanged: int = 0       # already registered / quarantined with the same version: skipped
    sidecars: int = 0
    retired: int = 0         # known locations no longer listed (deleted files): their rows leave the dataset
    recaptioned: int = 0     # scored media whose sidecar caption changed, appeared or vanished: scored again
    reasons: dict[str, int] = field(default_factory=dict)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_sidecar(key: str, cfg: CurationConfig) -> bool:
    return PurePosixPath(key).suffix.lower() in cfg.section("media")["caption_extensions"]


def register_sources(source: Source, catalog: Catalog, cfg: CurationConfig, shard: int | None = None,
                     progress: Any = None) -> RegisterStats:
    """Register every new or changed object of ``source`` (only those of ``shard`` when given), and retire the
    catalog's locations that the (complete) listing no longer holds.

    Never raises for a bad file: probing problems are quarantined with their reason and the run goes on. Raises
    ``TransientStoreError`` (one line: operation, object, what to do) when the store or file system keeps failing
    after the retries; nothing of that object is recorded, so the next run tries it again."""
    media_cfg = cfg.section("media")
    stats = RegisterStats()
    known = catalog.known_versions(source.name)
    listed: set[str] = set()
    sidecars: dict[str, tuple[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="k5-register-") as tmp:
        for obj in source.iter_objects():  # the store lists everything first: a failed listing retires nothing
            if is_sidecar(obj.key, cfg):
                stats.sidecars += 1
                sidecars[obj.key] = (obj.uri, obj.version)
                continue
            obj_shard = shard_of(obj.key, cfg["shards"])
            if shard is not None and obj_shard != shard:
                continue
            stats.listed += 1
            listed.add(obj.uri)
            if progress is not None:
                progress.update(1)
            if known.get(obj.uri) == obj.version:
                stats.unchanged += 1
                continue
            with_retries(lambda obj=obj, obj_shard=obj_shard: _register_one(
                source, catalog, obj, obj_shard, media_cfg, Path(tmp), stats),
                operation="registering", target=obj.uri, policy=cfg.retry_policy)
    stats.retired = len(catalog.retire_missing(source.name, listed, shard))
    catalog.record_sidecars(source.name, sidecars)
    stale = [media_id for media_id, key, version in catalog.scored_sidecars(source.name, shard)
             if sidecars.get(sidecar_key(key), ("", ""))[1] != version]
    catalog.unscore(stale)
    stats.recaptioned = len(stale)
    return stats


def _register_one(source: Source, catalog: Catalog, obj: SourceObject, shard: int, media_cfg: dict,
                  tmp: Path, stats: RegisterStats) -> None:
    where = dict(uri=obj.uri, source=source.name, key=obj.key, shard=shard, size=obj.size, version=obj.version)
    path, temporary = None, False
    try:
        ext = PurePosixPath(obj.key).suffix.lower()
        if obj.size == 0 or ext not in media_cfg["image_extensions"] + media_cfg["video_extensions"]:
            # Decided from the listing alone: no need to download.
            probe_file("/dev/null", obj.key, obj.size, media_cfg["image_extensions"], media_cfg["video_extensions"])
        outside = source.external_target(obj.key)
        if outside is not None and not media_cfg.get("allow_external_symlinks", False):
            raise ProbeError(f"symlink out of the source folder (to {outside}): refused; set "
                             "media.allow_external_symlinks: true to curate files linked from elsewhere")
        path, temporary = source.local_path(obj, tmp)
        # Probe before the hash shortcut: a byte copy under a wrong name is still a mislabelled file.
        info = probe_file(path, obj.key, obj.size, media_cfg["image_extensions"], media_cfg["video_extensions"],
                          max_megapixels=media_cfg.get("max_megapixels"))
        media_id = file_hash(path)
        new = catalog.register(media_id, info.to_dict(), **where)
        stats.new_media += int(new)
        stats.new_copies += int(not new)
    except ProbeError as err:
        _quarantine(catalog, where, str(err), stats)
    except Exception as err:
        if is_transient(err):  # a condition, not a verdict on the file: the caller retries, then stops the run
            raise
        # an unexpected decoder error must not stop the run: the file is quarantined with its error class
        _quarantine(catalog, where, f"unreadable: {type(err).__name__}: {err}", stats)
    finally:
        if temporary and path is not None:
            path.unlink(missing_ok=True)


def _quarantine(catalog: Catalog, where: dict, reason: str, stats: RegisterStats) -> None:
    catalog.quarantine(reason=reason, error_class=PERMANENT, **where)
    stats.quarantined += 1
    kind = reason.split(":")[0]
    stats.reasons[kind] = stats.reasons.get(kind, 0) + 1

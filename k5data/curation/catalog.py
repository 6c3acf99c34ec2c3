"""DuckDB catalog (report §4.1, tables in schema ``curation`` so the file can be shared): media keyed by content hash,
where each copy lives, quarantine, per-row scores.

Connections are opened per operation and retried on lock errors, so several Dagster runs (one per source shard)
can share one catalog file: the slow scoring happens outside any connection.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS curation;
CREATE TABLE IF NOT EXISTS curation.media (
    media_id VARCHAR PRIMARY KEY, kind VARCHAR, format VARCHAR, codec VARCHAR, width INTEGER, height INTEGER,
    fps DOUBLE, duration DOUBLE, n_frames INTEGER, size BIGINT, source VARCHAR, first_uri VARCHAR,
    registered_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS curation.locations (
    source_uri VARCHAR PRIMARY KEY, media_id VARCHAR, source VARCHAR, key VARCHAR, shard INTEGER, size BIGINT,
    version VARCHAR);
CREATE TABLE IF NOT EXISTS curation.quarantine (
    source_uri VARCHAR PRIMARY KEY, source VARCHAR, key VARCHAR, shard INTEGER, size BIGINT, version VARCHAR,
    reason VARCHAR, seen_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS curation.items (
    media_id VARCHAR, scene_index INTEGER, data JSON, PRIMARY KEY (media_id, scene_index));
CREATE TABLE IF NOT EXISTS curation.scored (
    media_id VARCHAR PRIMARY KEY, scored_at TIMESTAMP DEFAULT current_timestamp);
ALTER TABLE curation.quarantine ADD COLUMN IF NOT EXISTS error_class VARCHAR;
CREATE TABLE IF NOT EXISTS curation.sidecars (source_uri VARCHAR PRIMARY KEY, source VARCHAR, key VARCHAR,
    version VARCHAR);
ALTER TABLE curation.scored ADD COLUMN IF NOT EXISTS sidecar_version VARCHAR;
"""
PERMANENT, TRANSIENT = "permanent", "transient"  # quarantine error classes: a verdict on the file / a condition


class Catalog:
    """The curation catalog in one DuckDB file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.execute(SCHEMA)

    @contextmanager
    def connect(self, attempts: int = 60) -> Iterator[duckdb.DuckDBPyConnection]:
        for attempt in range(attempts):
            try:
                con = duckdb.connect(str(self.path))
                break
            except duckdb.IOException as err:  # another process holds the write lock
                if "lock" not in str(err).lower() or attempt == attempts - 1:
                    raise
                time.sleep(0.2 + random.random() * 0.5)
        try:
            yield con
        finally:
            con.close()

    # --- registration -------------------------------------------------------------------------------------------
    def known_versions(self, source: str) -> dict[str, str]:
        """uri -> version of every object of ``source`` already registered or quarantined for good (entries of
        transient errors are left out, so the next run tries them again)."""
        with self.connect() as con:
            rows = con.execute("SELECT source_uri, version FROM curation.locations WHERE source = ? UNION ALL "
                               "SELECT source_uri, version FROM curation.quarantine WHERE source = ? "
                               "AND coalesce(error_class, '') <> ?", [source, source, TRANSIENT]).fetchall()
        return dict(rows)

    def retire_missing(self, source: str, listed: set[str], shard: int | None = None) -> list[str]:
        """Forget every location and quarantine entry of ``source`` (of ``shard`` when given) whose URI is not in
        ``listed`` (a complete listing): deleted files leave the dataset. Returns the retired URIs."""
        where = "source = ?" + (" AND shard = ?" if shard is not None else "")
        params: list[Any] = [source] + ([shard] if shard is not None else [])
        with self.connect() as con:
            known = [r[0] for r in con.execute(f"SELECT source_uri FROM curation.locations WHERE {where} UNION "
                                               f"SELECT source_uri FROM curation.quarantine WHERE {where}",
                                               params + params).fetchall()]
            gone = sorted(uri for uri in known if uri not in listed)
            if gone:
                con.execute("BEGIN")
                for table in ("locations", "quarantine"):
                    con.executemany(f"DELETE FROM curation.{table} WHERE source_uri = ?", [[u] for u in gone])
                con.execute("COMMIT")
        return gone

    def has_media(self, media_id: str) -> bool:
        with self.connect() as con:
            return con.execute("SELECT 1 FROM curation.media WHERE media_id = ?", [media_id]).fetchone() is not None

    def register(self, media_id: str, info: dict[str, Any], *, uri: str, source: str, key: str, shard: int,
                 size: int, version: str) -> bool:
        """Record one copy of a media file; returns True if the content itself was new."""
        with self.connect() as con:
            con.execute("BEGIN")
            new = con.execute("SELECT 1 FROM curation.media WHERE media_id = ?", [media_id]).fetchone() is None
            if new:
                con.execute(
                    "INSERT INTO curation.media (media_id, kind, format, codec, width, height, fps, duration, "
                    "n_frames, size, source, first_uri) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [media_id, info["kind"], info["format"], info["codec"], info["width"], info["height"], info["fps"],
                     info["duration"], info["n_frames"], size, source, uri])
            con.execute("DELETE FROM curation.quarantine WHERE source_uri = ?", [uri])
            con.execute("INSERT OR REPLACE INTO curation.locations VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [uri, media_id, source, key, shard, size, version])
            con.execute("COMMIT")
        return new

    def quarantine(self, *, uri: str, source: str, key: str, shard: int, size: int, version: str, reason: str,
                   error_class: str = PERMANENT) -> None:
        """Move one location to quarantine with its reason and error class (``PERMANENT``: the file is bad;
        ``TRANSIENT``: a condition, tried again by the next run)."""
        with self.connect() as con:
            con.execute("BEGIN")
            con.execute("DELETE FROM curation.locations WHERE source_uri = ?", [uri])
            con.execute("INSERT OR REPLACE INTO curation.quarantine "
                        "(source_uri, source, key, shard, size, version, reason, error_class) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [uri, source, key, shard, size, version, reason,
                                                            error_class])
            con.execute("COMMIT")

    def quarantine_media(self, media_id: str, reason: str, error_class: str = PERMANENT) -> int:
        """Move every location of ``media_id`` to quarantine (a file that probed fine but failed scoring): its
        copies are bad alike, and the media stays unscored. Returns how many locations moved."""
        with self.connect() as con:
            con.execute("BEGIN")
            moved = con.execute(
                "INSERT OR REPLACE INTO curation.quarantine "
                "(source_uri, source, key, shard, size, version, reason, error_class) "
                "SELECT source_uri, source, key, shard, size, version, ?, ? FROM curation.locations "
                "WHERE media_id = ?", [reason, error_class, media_id]).fetchone()[0]
            con.execute("DELETE FROM curation.locations WHERE media_id = ?", [media_id])
            con.execute("COMMIT")
        return int(moved)

    # --- sidecar captions: a changed caption file means its media is scored again -------------------------------
    def record_sidecars(self, source: str, sidecars: dict[str, tuple[str, str]]) -> None:
        """Replace the listed sidecars of ``source``: key -> (uri, version)."""
        with self.connect() as con:
            con.execute("BEGIN")
            con.execute("DELETE FROM curation.sidecars WHERE source = ?", [source])
            if sidecars:  # why: DuckDB's executemany refuses an empty list
                con.executemany("INSERT OR REPLACE INTO curation.sidecars VALUES (?, ?, ?, ?)",
                                [[uri, source, key, version] for key, (uri, version) in sidecars.items()])
            con.execute("COMMIT")

    def sidecar_version(self, source: str, key: str) -> str:
        """The listed version of sidecar ``key`` of ``source`` ('' when there is none)."""
        with self.connect() as con:
            row = con.execute("SELECT version FROM curation.sidecars WHERE source = ? AND key = ?",
                              [source, key]).fetchone()
        return row[0] if row else ""

    def sidecar_keys(self, source: str) -> set[str]:
        """Keys of the listed sidecars of ``source`` (the uncaptioned-media check before scoring)."""
        with self.connect() as con:
            return {row[0] for row in con.execute("SELECT key FROM curation.sidecars WHERE source = ?",
                                                  [source]).fetchall()}

    def scored_sidecars(self, source: str, shard: int | None = None) -> list[tuple[str, str, str]]:
        """(media_id, key of its first location, sidecar version it was scored with) of the scored media of
        ``source`` (of ``shard`` when given); media scored before versions were recorded are left out."""
        sql = ("SELECT s.media_id, l.key, s.sidecar_version FROM curation.scored s "
               "JOIN (SELECT *, row_number() OVER (PARTITION BY media_id ORDER BY source_uri) AS rn "
               "FROM curation.locations) l ON l.media_id = s.media_id AND l.rn = 1 "
               "WHERE l.source = ? AND s.sidecar_version IS NOT NULL")
        params: list[Any] = [source]
        if shard is not None:
            sql += " AND l.shard = ?"
            params.append(shard)
        with self.connect() as con:
            return [tuple(r) for r in con.execute(sql, params).fetchall()]

    def unscore(self, media_ids: list[str]) -> None:
        """Mark media unscored (their rows are replaced when they are scored again)."""
        if not media_ids:
            return
        with self.connect() as con:
            con.executemany("DELETE FROM curation.scored WHERE media_id = ?", [[m] for m in media_ids])

    # --- scoring ------------------------------------------------------------------------------------------------
    def unscored(self, source: str | None = None, shard: int | None = None) -> list[dict[str, Any]]:
        """Media (with one location each) not yet scored, optionally limited to a source / shard."""
        sql = ("SELECT m.*, l.source_uri, l.key, l.shard, l.version, l.source AS loc_source FROM curation.media m "
               "JOIN (SELECT *, row_number() OVER (PARTITION BY media_id ORDER BY source_uri) AS rn "
               "FROM curation.locations) l "
               "ON l.media_id = m.media_id AND l.rn = 1 WHERE m.media_id NOT IN (SELECT media_id FROM curation.scored)")
        params: list[Any] = []
        if source is not None:
            sql += " AND l.source = ?"
            params.append(source)
        if shard is not None:
            sql += " AND l.shard = ?"
            params.append(shard)
        with self.connect() as con:
            cur = con.execute(sql + " ORDER BY l.key", params)
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    def save_items(self, media_id: str, items: list[dict[str, Any]], sidecar_version: str = "") -> None:
        """Store the rows of one media file and mark it scored (with the sidecar version it read), in one
        transaction: nothing is marked scored without its rows."""
        with self.connect() as con:
            con.execute("BEGIN")
            con.execute("DELETE FROM curation.items WHERE media_id = ?", [media_id])
            for item in items:
                con.execute("INSERT INTO curation.items VALUES (?, ?, ?)",
                            [media_id, int(item["scene_index"]), json.dumps(item, default=_json_default)])
            con.execute("INSERT OR REPLACE INTO curation.scored (media_id, sidecar_version) VALUES (?, ?)",
                        [media_id, sidecar_version])
            con.execute("COMMIT")

    def items(self, source: str | None = None) -> list[dict[str, Any]]:
        """Every scored row with its media's catalog fields (first location as ``source_uri``)."""
        sql = ("SELECT i.data, m.size, m.codec, m.fps AS media_fps, m.duration AS media_duration, l.source_uri, "
               "l.source FROM curation.items i JOIN curation.media m USING (media_id) "
               "JOIN (SELECT *, row_number() OVER (PARTITION BY media_id ORDER BY source_uri) AS rn "
               "FROM curation.locations) l "
               "ON l.media_id = i.media_id AND l.rn = 1")
        params: list[Any] = []
        if source is not None:
            sql += " WHERE l.source = ?"
            params.append(source)
        with self.connect() as con:
            rows = con.execute(sql + " ORDER BY l.key, i.scene_index", params).fetchall()
        out = []
        for data, size, codec, fps, duration, uri, src in rows:
            item = json.loads(data)
            item.update(size=size, codec=codec, fps=fps, media_duration=duration, source_uri=uri, source=src)
            out.append(item)
        return out

    def quarantined(self, source: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT source_uri, reason, source, key, coalesce(error_class, ?) FROM curation.quarantine"
        params = [PERMANENT] + ([] if source is None else [source])
        with self.connect() as con:
            rows = con.execute(sql + (" WHERE source = ?" if source else "") + " ORDER BY key, source_uri",
                               params).fetchall()
        return [dict(source_uri=r[0], reason=r[1], source=r[2], key=r[3], error_class=r[4]) for r in rows]

    def counts(self) -> dict[str, int]:
        with self.connect() as con:
            return {t: con.execute(f"SELECT count(*) FROM curation.{t}").fetchone()[0]
                    for t in ("media", "locations", "quarantine", "items")}


def _json_default(value: Any) -> Any:
    # numpy scalars / arrays end up in score dicts; store them as plain JSON numbers and lists.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the catalog")

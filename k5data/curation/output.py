"""Dataset assembly: global dedup, pass/reject decision, k-means clusters, buckets; Parquet to a folder or S3.

Layout (report §4.2/§4.4): one version per write, ``OUT/versions/<version>/dataset/<bucket>/<source>/``
``part-00000.parquet`` with bucket 256/512/1024 by the short side (0 for rows under 256, which are rejected), plus
``OUT/versions/<version>/quarantine.parquet``; ``OUT/CURRENT.json`` names the current version and its files.
A write puts the new version beside the old ones and then switches ``CURRENT.json`` in one PUT, so readers see the
old dataset or the new one, never a half-written or missing one; a failed write leaves the previous version current.
After a switch, versions other than the new and the previous one are deleted. One writer at a time: a write holds the
output's lease (``k5data.leases``, ``OUT/_lease.json``); a second concurrent writer is refused naming the holder.
Outputs written before versioning
(``OUT/dataset/``, ``OUT/quarantine.parquet``) are read while no ``CURRENT.json`` exists."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from k5data.curation.config import CurationConfig
from k5data.curation.domains import kmeans_clusters
from k5data.curation.filters.dedup import find_duplicates
from k5data.curation.filters.resolution import bucket_of
from k5data.leases import Lease, acquire_lease
from k5data.object_store import ObjectStore, key_order, open_store

FILTERS = ["resolution", "dynamics", "text_area", "watermark", "quality", "complexity", "motion"]
COLUMNS = (["media_id", "source_uri", "source", "kind", "scene_index", "start_s", "end_s", "width", "height",
            "codec", "fps", "size", "phash"]
           + [f"{f}_{s}" for f in FILTERS for s in ("score", "backend", "passed")]
           + ["text_boxes", "quality_technical", "quality_aesthetic", "complexity_edges", "complexity_regions",
              "camera_motion", "object_motion", "dup_of", "caption", "caption_backend", "domain", "domain_backend",
              "cluster", "bucket", "passed", "reject_reason"]
           # model-backed columns (null on the heuristic default): the watermark pair, Q-Align, light dynamics,
           # object and scene classes (report §4.1)
           + ["watermark_classifier", "watermark_detector", "quality_qalign", "quality_qalign_aesthetic",
              "light_motion", "objects", "objects_backend", "scene_location", "scene_style", "scene_subject",
              "scene_place", "scene_backend"])
QUARANTINE_COLUMNS = ["source_uri", "reason", "error_class"]
POINTER = "CURRENT.json"
VERSIONS = "versions/"
WRITE_LEASE_TTL_S = 120.0


def reasons_of(row: dict[str, Any], require_caption: bool) -> list[str]:
    """Failed checks of one row in pipeline order (without dedup, which needs all rows)."""
    out = [row["scene_reason"]] if row.get("scene_reason") else []
    out += [row[f"{f}_reason"] for f in FILTERS if row.get(f"{f}_passed") is False]
    if require_caption and row.get("skipped") is None and not row.get("caption"):
        out.append("no_caption")
    return out


def build_rows(items: list[dict[str, Any]], cfg: CurationConfig) -> list[dict[str, Any]]:
    """Final rows from the catalog's scored items (all sources: duplicates are found across the whole catalog)."""
    d, clusters = cfg.section("filters.dedup"), cfg.section("clusters")
    require = cfg.section("captions")["require"]
    for row in items:
        row["_reasons"] = reasons_of(row, require)
    dup_of = find_duplicates(items, d["image_radius"], d["video_radius"])
    for i, row in enumerate(items):
        row["dup_of"] = None
        if i in dup_of:
            keep = items[dup_of[i]]
            row["dup_of"] = f"{keep['media_id']}#{keep['scene_index']}"
            row["_reasons"].append("duplicate")
        row["passed"] = not row["_reasons"]
        row["reject_reason"] = ";".join(row["_reasons"]) or None
        row["bucket"] = bucket_of(min(row["width"], row["height"]), cfg["buckets"])
        row["phash"] = ",".join(f"{h:016x}" for h in row.get("hash") or [])
        row["cluster"] = -1
    with_emb = [i for i, r in enumerate(items) if r.get("embedding")]
    fit_on = [i for i in with_emb if items[i]["passed"]] or with_emb
    if fit_on:
        # Fit on passed rows (what training samples from), then assign every embedded row to its nearest centre.
        _, model = kmeans_clusters(np.array([items[i]["embedding"] for i in fit_on]), clusters["k"], clusters["seed"])
        labels = model.predict(np.array([items[i]["embedding"] for i in with_emb]))
        for i, label in zip(with_emb, labels):
            items[i]["cluster"] = int(label)
    return [{c: r.get(c) for c in COLUMNS} for r in items]


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ["scene_index", "width", "height", "bucket", "cluster", "size"]:
        df[col] = df[col].astype("int64")
    for col in [c for c in COLUMNS if c.endswith("_passed")] + ["passed"]:
        df[col] = df[col].astype("boolean")
    return df


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    return buf.getvalue()


def open_output(out: str | ObjectStore, cfg: CurationConfig, create: bool = True) -> ObjectStore:
    """The store of a curation output: ``out`` itself, or the folder / ``s3://`` prefix it names (S3 endpoint and
    region from ``cfg``)."""
    if not isinstance(out, str):
        return out
    return open_store(out, cfg.endpoint_url, region=cfg.section("s3")["region"], create=create,
                      retry=cfg.retry_policy)


def write_outputs(rows: list[dict[str, Any]], quarantine: list[dict[str, Any]], out: str | ObjectStore,
                  cfg: CurationConfig) -> list[str]:
    """Publish the dataset and its quarantine table to ``out`` (folder, ``s3://`` prefix or store) as a new
    version, switch ``CURRENT.json`` to it, then delete versions older than the previous one; returns the written
    objects' URIs (the pointer last). Raises (the previous version stays current) when a write fails."""
    store = open_output(out, cfg)
    # why: two curation runs on one output would each switch CURRENT.json and delete the other's versions
    with acquire_lease(store, "", holder=f"curation write (pid {os.getpid()})", ttl_s=WRITE_LEASE_TTL_S) as lease:
        return _write_version(store, rows, quarantine, lease)


def _write_version(store: ObjectStore, rows: list[dict[str, Any]], quarantine: list[dict[str, Any]],
                   lease: Lease) -> list[str]:
    previous = _pointer(store)
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:8]
    base = f"{VERSIONS}{version}/"
    df = to_frame(rows)
    parts, written = [], []
    for (bucket, source), part in df.groupby(["bucket", "source"], sort=True):
        key = f"{base}dataset/{bucket}/{source}/part-00000.parquet"
        written.append(store.put_bytes(key, _parquet_bytes(part)))
        parts.append(key)
    qdf = pd.DataFrame([{c: q.get(c) for c in QUARANTINE_COLUMNS} for q in quarantine], columns=QUARANTINE_COLUMNS)
    written.append(store.put_bytes(f"{base}quarantine.parquet", _parquet_bytes(qdf.astype("string"))))
    missing = sorted(set(parts) - set(store.list(base)))
    if missing:  # why: never point readers at a version whose files are gone (a concurrent writer's cleanup)
        raise RuntimeError(f"dataset version {store.uri(base)} lost {len(missing)} files before the switch "
                           f"(first: {missing[0]}); another writer may be cleaning up this output - re-run alone")
    manifest = {"format": 1, "version": version, "dataset": parts, "quarantine": f"{base}quarantine.parquet",
                "rows": len(df), "quarantined": len(qdf), "previous": (previous or {}).get("version"),
                "written_at": datetime.now(UTC).isoformat()}
    lease.check()  # a writer whose lease was taken over (it stalled past the TTL) must not switch the pointer
    written.append(store.put_bytes(POINTER, json.dumps(manifest, indent=1).encode()))
    _collect_garbage(store, keep={version, (previous or {}).get("version")})
    return written


def current_version(out: str | ObjectStore, cfg: CurationConfig) -> dict[str, Any] | None:
    """The manifest of the current dataset version under ``out`` (``version``, ``dataset``: part keys,
    ``quarantine``: its key, ``rows``, ``previous``...), or None before the first versioned write."""
    return _pointer(open_output(out, cfg, create=False))


def _pointer(store: ObjectStore) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(POINTER))
    except FileNotFoundError:
        return None


def _collect_garbage(store: ObjectStore, keep: set[str | None]) -> None:
    """Delete versions not in ``keep`` that are older than the newest kept one (a newer one may be a concurrent
    writer's, still in progress), and the pre-versioning layout."""
    newest = max(v for v in keep if v)
    versions = {k[len(VERSIONS):].split("/", 1)[0] for k in store.list(VERSIONS)}
    for old in sorted(v for v in versions if v not in keep and v < newest):
        store.delete_prefix(f"{VERSIONS}{old}/")
    store.delete_prefix("dataset/")
    if store.exists("quarantine.parquet"):
        store.delete_prefix("quarantine.parquet")


def summarize(rows: list[dict[str, Any]], quarantine: list[dict[str, Any]]) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    for row in rows:
        for reason in (row["reject_reason"] or "").split(";"):
            if reason:
                reasons[reason] += 1
    passed = [r for r in rows if r["passed"]]
    return {
        "rows": len(rows), "images": sum(r["kind"] == "image" for r in rows),
        "scenes": sum(r["kind"] == "video" for r in rows), "passed": len(passed), "rejected": len(rows) - len(passed),
        "quarantined": len(quarantine), "reject_reasons": dict(sorted(reasons.items())),
        "buckets": dict(sorted(Counter(str(r["bucket"]) for r in passed).items())),
        "domains": dict(sorted(Counter(r["domain"] for r in passed).items())),
    }


def read_dataset(out: str | ObjectStore, cfg: CurationConfig) -> pd.DataFrame:
    """All dataset rows of the current version under ``out`` (folder, ``s3://`` prefix or store), for checks, tests
    and the encoder; raises when the files disagree with the manifest's row count."""
    store = open_output(out, cfg, create=False)
    manifest = _pointer(store)
    if manifest is None:  # an output written before versioning (or none yet)
        keys = sorted((k for k in store.list("dataset/") if k.endswith(".parquet")), key=key_order)
    else:
        keys = sorted(manifest["dataset"], key=key_order)
    parts = [pq.read_table(io.BytesIO(store.get_bytes(k))) for k in keys]
    df = (pd.concat([p.to_pandas() for p in parts], ignore_index=True) if parts
          else pd.DataFrame(columns=COLUMNS))
    if manifest is not None and len(df) != manifest["rows"]:
        raise RuntimeError(f"dataset version {manifest['version']} under {store.location} holds {len(df)} rows, its "
                           f"manifest {POINTER} says {manifest['rows']}; re-run the curation to rewrite it")
    return df


def read_quarantine(out: str | ObjectStore, cfg: CurationConfig) -> pd.DataFrame:
    """The quarantine table of the current version under ``out`` (source_uri, reason, error_class)."""
    store = open_output(out, cfg, create=False)
    manifest = _pointer(store)
    key = manifest["quarantine"] if manifest is not None else "quarantine.parquet"
    if manifest is None and not store.exists(key):
        return pd.DataFrame(columns=QUARANTINE_COLUMNS)
    return pq.read_table(io.BytesIO(store.get_bytes(key))).to_pandas()

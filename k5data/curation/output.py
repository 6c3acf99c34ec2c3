"""Dataset assembly: global dedup, pass/reject decision, k-means clusters, buckets; Parquet to a folder or S3.

Layout (report §4.2/§4.4): ``OUT/dataset/<bucket>/<source>/part-00000.parquet`` with bucket 256/512/1024 by the
short side (0 for rows under 256, which are rejected), plus ``OUT/quarantine.parquet``."""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from k5data.curation.config import CurationConfig
from k5data.curation.domains import kmeans_clusters
from k5data.curation.filters.dedup import find_duplicates
from k5data.curation.filters.resolution import bucket_of
from k5data.object_store import ObjectStore, key_order, open_store

FILTERS = ["resolution", "dynamics", "text_area", "watermark", "quality", "complexity", "motion"]
COLUMNS = (["media_id", "source_uri", "source", "kind", "scene_index", "start_s", "end_s", "width", "height",
            "codec", "fps", "size", "phash"]
           + [f"{f}_{s}" for f in FILTERS for s in ("score", "backend", "passed")]
           + ["text_boxes", "quality_technical", "quality_aesthetic", "complexity_edges", "complexity_regions",
              "camera_motion", "object_motion", "dup_of", "caption", "caption_backend", "domain", "domain_backend",
              "cluster", "bucket", "passed", "reject_reason"])
QUARANTINE_COLUMNS = ["source_uri", "reason"]


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
    return open_store(out, cfg.endpoint_url, region=cfg.section("s3")["region"], create=create)


def write_outputs(rows: list[dict[str, Any]], quarantine: list[dict[str, Any]], out: str | ObjectStore,
                  cfg: CurationConfig) -> list[str]:
    """Write the partitioned dataset and quarantine.parquet to ``out`` (folder, ``s3://`` prefix or store); returns
    the written objects' URIs."""
    store = open_output(out, cfg)
    # The dataset is a pure function of the catalog: rewrite it whole so removed rows do not linger.
    store.delete_prefix("dataset/")
    df = to_frame(rows)
    written = []
    for (bucket, source), part in df.groupby(["bucket", "source"], sort=True):
        written.append(store.put_bytes(f"dataset/{bucket}/{source}/part-00000.parquet", _parquet_bytes(part)))
    qdf = pd.DataFrame([{c: q[c] for c in QUARANTINE_COLUMNS} for q in quarantine], columns=QUARANTINE_COLUMNS)
    written.append(store.put_bytes("quarantine.parquet", _parquet_bytes(qdf.astype("string"))))
    return written


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
    """All dataset rows under ``out`` (folder, ``s3://`` prefix or store), for checks, tests and the encoder."""
    store = open_output(out, cfg, create=False)
    keys = sorted((k for k in store.list("dataset/") if k.endswith(".parquet")), key=key_order)
    parts = [pq.read_table(io.BytesIO(store.get_bytes(k))) for k in keys]
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat([p.to_pandas() for p in parts], ignore_index=True)

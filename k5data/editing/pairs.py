"""The editing-pair mining driver (report §4.3): curated image rows -> candidate pairs (nearest neighbours in the
CLIP and DINO indexes, per-cluster CLIP thresholds) -> verified pairs (geometry, aligned DINO, overlap analysis,
Table 1, instructions, SFT subset), each stage a Parquet object in the store.

The pairs table (``PAIR_COLUMNS``, read back with ``read_edit_pairs``) is the interface to the instruct-editing
latents: one row per candidate pair, kept or dropped, every score and the drop reason. Direction: the pair member
with the higher aesthetic score is the target (an edit should lead to the better picture; the report filters the SFT
subset on the target alone); ties go by media id."""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from k5data.editing.config import EditMiningConfig
from k5data.editing.embeddings import FaceEmbedder, clip_embedder, dino_embedder, face_similarity
from k5data.editing.geometry import make_matcher, resize_long, verify
from k5data.editing.index import nearest_neighbours
from k5data.editing.instructions import InstructionWriter
from k5data.editing.rules import DROP_REASONS, KEEP_RULES, PairScores, decide
from k5data.latents.media import MediaFetcher, load_image
from k5data.object_store import ObjectStore

CANDIDATES_KEY = "editing/edit_candidates.parquet"
PAIRS_KEY = "editing/edit_pairs.parquet"
EMBED_SIDE = 512  # images are embedded at this long side
CANDIDATE_COLUMNS = ["pair_id", "source_media_id", "target_media_id", "source_uri", "target_uri", "width", "height",
                     "source_cluster", "target_cluster", "clip_sim", "dino_sim", "face_sim", "clip_thr",
                     "target_caption", "target_quality_technical", "target_quality_aesthetic", "found_by"]
PAIR_COLUMNS = CANDIDATE_COLUMNS + ["inliers", "inlier_groups", "matches", "overlap", "aligned_dino_sim",
                                    "adaptive_ok", "kept", "rule", "drop_reason", "instruction", "sft"]


def mining_rows(curated: pd.DataFrame, cfg: EditMiningConfig) -> pd.DataFrame:
    """The curated image rows that are mined: passed, or rejected only for ``cfg.include_rejected`` reasons."""
    images = curated[(curated["kind"] == "image") & (curated["bucket"] > 0)]
    allowed = set(cfg.include_rejected)

    def eligible(row: pd.Series) -> bool:
        if bool(row["passed"]):
            return True
        reason = row["reject_reason"]
        reasons = set(str(reason).split(";")) - {""} if isinstance(reason, str) else set()
        return bool(reasons) and reasons <= allowed

    return images[images.apply(eligible, axis=1)].reset_index(drop=True) if len(images) else images


def pair_id(source_media_id: str, target_media_id: str) -> str:
    return hashlib.sha256(f"{source_media_id}|{target_media_id}".encode()).hexdigest()[:20]


def cluster_thresholds(clusters: np.ndarray, neighbours: np.ndarray, sims: np.ndarray,
                       quantile: float) -> dict[int, float]:
    """clip_thr per cluster: the ``quantile`` of its members' top-k neighbour CLIP similarities (``sims``, with
    ``neighbours`` -1 where a row has fewer)."""
    out = {}
    for c in np.unique(clusters):
        members = clusters == c
        found = sims[members][neighbours[members] >= 0]
        out[int(c)] = float(np.quantile(found, quantile)) if found.size else 1.0
    return out


def _load_all(uris: list[str], fetch: MediaFetcher, side: int | None) -> list[np.ndarray]:
    images = [load_image(fetch.local(u)) for u in uris]
    return [resize_long(im, side) if side and max(im.shape[:2]) > side else im for im in images]


def find_candidates(curated: pd.DataFrame, cfg: EditMiningConfig,
                    endpoint_url: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Candidate pairs of the mined rows through the CLIP and DINO nearest-neighbour indexes (never all pairs)."""
    rows = mining_rows(curated, cfg)
    n = len(rows)
    with tempfile.TemporaryDirectory(prefix="k5-edit-") as td:
        images = _load_all(rows["source_uri"].tolist(), MediaFetcher(Path(td), endpoint_url), EMBED_SIDE)
        clip_e, dino_e = clip_embedder(cfg.clip_backend, cfg.clip_model_path), dino_embedder(cfg.dino_backend,
                                                                                          cfg.dino_model_path)
        face_e = FaceEmbedder(cfg.face_backend, cfg.face_model_path)
        clip = np.stack([clip_e.embed(im) for im in images]) if n else np.zeros((0, 1), np.float32)
        dino = np.stack([dino_e.embed(im) for im in images]) if n else np.zeros((0, 1), np.float32)
        faces = [face_e.embed(im) for im in images]
    k = max(1, min(cfg.neighbours, n - 1))
    by_clip = nearest_neighbours(clip, k, cfg.hnsw_m, cfg.hnsw_ef_search)
    by_dino = nearest_neighbours(dino, k, cfg.hnsw_m, cfg.hnsw_ef_search)
    clusters = rows["cluster"].to_numpy() if n else np.zeros(0, np.int64)
    thr = (cluster_thresholds(clusters, by_clip.neighbours, by_clip.similarities, cfg.clip_thr_quantile)
           if n > 1 else {})
    found: dict[tuple[int, int], set[str]] = {}
    for name, res in (("clip", by_clip), ("dino", by_dino)):
        for i in range(n if n > 1 else 0):
            for j, s in zip(res.neighbours[i], res.similarities[i]):
                if j >= 0 and s >= cfg.min_candidate_sim:
                    found.setdefault((min(i, int(j)), max(i, int(j))), set()).add(name)
    aesthetic = rows["quality_aesthetic"].fillna(-1.0).to_numpy() if n else np.zeros(0)
    out = []
    for (i, j), how in sorted(found.items()):
        src, tgt = (i, j) if (aesthetic[j], rows["media_id"][j]) > (aesthetic[i], rows["media_id"][i]) else (j, i)
        s, t = rows.iloc[src], rows.iloc[tgt]
        out.append({
            "pair_id": pair_id(s["media_id"], t["media_id"]), "source_media_id": s["media_id"],
            "target_media_id": t["media_id"], "source_uri": s["source_uri"], "target_uri": t["source_uri"],
            "width": int(t["width"]), "height": int(t["height"]), "source_cluster": int(s["cluster"]),
            "target_cluster": int(t["cluster"]), "clip_sim": float(clip[i] @ clip[j]),
            "dino_sim": float(dino[i] @ dino[j]), "face_sim": face_similarity(faces[i], faces[j]),
            "clip_thr": max(thr[int(s["cluster"])], thr[int(t["cluster"])]), "target_caption": t["caption"],
            "target_quality_technical": t["quality_technical"], "target_quality_aesthetic": t["quality_aesthetic"],
            "found_by": "+".join(sorted(how))})
    summary = {"images": n, "candidates": len(out), "all_pairs": n * (n - 1) // 2,
               "distance_evaluations": by_clip.distance_evaluations + by_dino.distance_evaluations,
               "clusters": len(thr), "embedders": f"{clip_e.name}+{dino_e.name}+{face_e.name}" if n else "",
               "faces": sum(f is not None for f in faces) if n else 0}
    return pd.DataFrame(out, columns=CANDIDATE_COLUMNS), summary


def sft_subset(technical: float | None, aesthetic: float | None, cfg: EditMiningConfig) -> bool:
    """Q-Align > sft_min_qalign and aesthetic > sft_min_aesthetic on the target, on Q-Align's 1-5 scale."""
    if technical is None or aesthetic is None or pd.isna(technical) or pd.isna(aesthetic):
        return False
    return 1 + 4 * float(technical) > cfg.sft_min_qalign and 1 + 4 * float(aesthetic) > cfg.sft_min_aesthetic


def rule_scores(row: dict[str, Any], aligned_dino_sim: float, inliers: int, overlap: float,
                cfg: EditMiningConfig) -> PairScores:
    """What Table 1 decides a candidate on. face_sim counts only where the face backend can tell people apart
    (``EditMiningConfig.applies_face_rules``); otherwise the rules see 0, "no faces"."""
    face = float(row["face_sim"]) if cfg.applies_face_rules else 0.0
    return PairScores(clip_sim=row["clip_sim"], dino_sim=row["dino_sim"], face_sim=face,
                      aligned_dino_sim=aligned_dino_sim, inliers=inliers, overlap=overlap, clip_thr=row["clip_thr"])


def verify_candidates(candidates: pd.DataFrame, cfg: EditMiningConfig,
                      endpoint_url: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Geometry, aligned DINO, Table 1, instructions of kept pairs and the SFT flag for every candidate."""
    matcher = make_matcher(cfg.matcher, cfg.loftr_weights)
    dino_e = dino_embedder(cfg.dino_backend, cfg.dino_model_path)
    writer = InstructionWriter(cfg.instruction_backend, cfg.instruction_model_path, cfg.instruction_max_new_tokens)
    out = []
    with tempfile.TemporaryDirectory(prefix="k5-edit-") as td:
        fetch, cache = MediaFetcher(Path(td), endpoint_url), {}

        def image(uri: str) -> np.ndarray:
            if uri not in cache:
                cache[uri] = load_image(fetch.local(uri))
            return cache[uri]

        for row in candidates.to_dict("records"):
            source, target = image(row["source_uri"]), image(row["target_uri"])
            geo = verify(source, target, matcher, match_side=cfg.match_side, ransac_px=cfg.ransac_px,
                         min_group=cfg.min_group, max_groups=cfg.max_groups, changed_level=cfg.changed_level)
            aligned = 0.0
            if geo.source_crop is not None and min(geo.source_crop.shape[:2]) >= 16:
                aligned = float(dino_e.embed(geo.source_crop) @ dino_e.embed(geo.target_crop))
            decision = decide(rule_scores(row, aligned, geo.inliers, geo.overlap, cfg), cfg.rules)
            t = cfg.rules.adaptive_t
            out.append({**row, "inliers": geo.inliers, "inlier_groups": len(geo.groups), "matches": geo.matches,
                        "overlap": geo.overlap, "aligned_dino_sim": aligned,
                        "adaptive_ok": bool(row["clip_sim"] > (1 - t) * row["clip_thr"] + t),
                        "kept": decision.kept, "rule": decision.rule, "drop_reason": decision.drop_reason,
                        "instruction": writer.write(source, target, geo.changed_box, row["target_caption"])
                        if decision.kept else "",
                        "sft": decision.kept and sft_subset(row["target_quality_technical"],
                                                            row["target_quality_aesthetic"], cfg)})
    pairs = pd.DataFrame(out, columns=PAIR_COLUMNS)
    return pairs, summarize_pairs(pairs) | {"matcher": matcher.name, "instructions": writer.name,
                                            "face_rules": cfg.applies_face_rules}


def summarize_pairs(pairs: pd.DataFrame) -> dict[str, Any]:
    drops = Counter(pairs.loc[~pairs["kept"].astype(bool), "drop_reason"]) if len(pairs) else Counter()
    rules = Counter(pairs.loc[pairs["kept"].astype(bool), "rule"]) if len(pairs) else Counter()
    return {"pairs": len(pairs), "kept": int(pairs["kept"].sum()) if len(pairs) else 0,
            "dropped": int((~pairs["kept"].astype(bool)).sum()) if len(pairs) else 0,
            "sft": int(pairs["sft"].sum()) if len(pairs) else 0,
            "drop_reasons": {r: int(drops.get(r, 0)) for r in DROP_REASONS},
            "kept_by_rule": {r: int(rules.get(r, 0)) for r in KEEP_RULES}}


def write_table(store: ObjectStore, key: str, df: pd.DataFrame) -> str:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    return store.put_bytes(key, buf.getvalue())  # one PUT: readers see the old table or the new one


def _key(store: ObjectStore, path: str) -> str:
    base = store.uri("").rstrip("/") + "/"
    return path[len(base):] if path.startswith(base) else path


def read_table(store: ObjectStore, path: str) -> pd.DataFrame:
    """A mining table by its key in ``store`` (or its full URI)."""
    key = _key(store, path)
    if not store.exists(key):
        raise FileNotFoundError(f"no editing table at {store.uri(key)}: materialize edit_candidates / edit_pairs "
                                "(or run `k5 edit-pairs`) first")
    return pq.read_table(io.BytesIO(store.get_bytes(key))).to_pandas()


def read_edit_pairs(store: ObjectStore, path: str = PAIRS_KEY) -> pd.DataFrame:
    """The pairs table (``PAIR_COLUMNS``; ``kept`` rows are the training pairs)."""
    df = read_table(store, path)
    missing = sorted(set(PAIR_COLUMNS) - set(df.columns))
    if missing:
        raise ValueError(f"{path} is not an edit-pairs table (missing columns {missing})")
    return df


def mine_candidates(curated: pd.DataFrame, store: ObjectStore, cfg: EditMiningConfig,
                    endpoint_url: str | None = None) -> dict[str, Any]:
    """Stage 1 into ``store``: returns the summary with ``path`` (key) and ``uri`` of the candidates table."""
    if curated.empty:
        raise ValueError("the curated dataset has no rows (wrong path, or not curated yet): run `k5 curate` or "
                         "materialize curated_dataset first")
    candidates, summary = find_candidates(curated, cfg, endpoint_url)
    uri = write_table(store, CANDIDATES_KEY, candidates)
    return {"path": CANDIDATES_KEY, "uri": uri, **summary}


def mine_pairs(store: ObjectStore, cfg: EditMiningConfig, candidates_path: str = CANDIDATES_KEY,
               endpoint_url: str | None = None) -> dict[str, Any]:
    """Stage 2 into ``store``: the verified pairs table; returns its summary with ``path`` and ``uri``."""
    pairs, summary = verify_candidates(read_table(store, candidates_path), cfg, endpoint_url)
    uri = write_table(store, PAIRS_KEY, pairs)
    return {"path": PAIRS_KEY, "uri": uri, **summary}

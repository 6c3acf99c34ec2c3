"""Candidate search through a FAISS HNSW index (inner product on unit vectors = cosine): each image asks for its
``k`` nearest neighbours, so the work grows as n * log(n) * k, never as the n^2 of all pairs. The index counts its
search distance evaluations (FAISS's ``hnsw_stats``), which the tests and the asset metadata report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NeighbourResult:
    neighbours: np.ndarray
    """(n, k) row indices of each row's nearest other rows (-1 where fewer exist)."""
    similarities: np.ndarray
    """(n, k) their cosine similarities."""
    distance_evaluations: int
    """Distances computed by the searches (FAISS ``hnsw_stats.ndis``). The graph build is one such search per
    inserted row (efConstruction wide), the same order; FAISS does not count it."""


def nearest_neighbours(emb: np.ndarray, k: int, m: int = 16, ef_search: int = 32,
                       ef_construction: int = 40) -> NeighbourResult:
    """The ``k`` nearest other rows of every row of ``emb`` (unit vectors) through an HNSW graph."""
    import faiss

    x = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = x.shape
    if n == 0:
        return NeighbourResult(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), 0)
    index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = max(ef_search, k + 1)
    index.add(x)
    before = int(faiss.cvar.hnsw_stats.ndis)
    sims, ids = index.search(x, min(k + 1, n))
    evaluations = int(faiss.cvar.hnsw_stats.ndis) - before
    out_ids = np.full((n, k), -1, np.int64)
    out_sims = np.zeros((n, k), np.float32)
    for i in range(n):
        keep = [(j, s) for j, s in zip(ids[i], sims[i]) if j >= 0 and j != i][:k]
        for c, (j, s) in enumerate(keep):
            out_ids[i, c], out_sims[i, c] = j, s
    return NeighbourResult(out_ids, out_sims, evaluations)

"""Image subdomains (report §4.6, §6.4: each VLM domain split into 2-9 semantically coherent subdomains).

Clustering runs inside one domain: k-means for every k in [k_min, k_max] (capped at n - 1 items), and the k with the
highest mean silhouette coefficient wins (ties: the smaller k). Silhouette compares each item's mean distance to its
own cluster with the nearest other cluster, so it rewards compact, separated groups without a preset k; it needs
k <= n - 1, and a domain with fewer than ``k_min + 1`` items stays one subdomain (recorded as too small to split).
Embeddings are whatever the caller supplies: production uses CLIP image embeddings; the demo the pooled latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

K_MIN, K_MAX = 2, 9  # the report's 2-9 subdomains per domain


@dataclass
class SubdomainSplit:
    """One domain's split: a label per item, the chosen k and every tried k's silhouette."""

    labels: np.ndarray
    k: int
    silhouettes: dict[int, float] = field(default_factory=dict)
    reason: str = ""


def split_domain(embeddings: np.ndarray, *, k_min: int = K_MIN, k_max: int = K_MAX, seed: int = 0) -> SubdomainSplit:
    """Subdomain labels of one domain's items (module docstring)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (items, dims), got shape {x.shape}")
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    n_distinct = len(np.unique(x.round(8), axis=0))
    top = min(k_max, len(x) - 1, n_distinct)
    if top < k_min:
        return SubdomainSplit(np.zeros(len(x), dtype=int), 1, {},
                              f"{len(x)} items ({n_distinct} distinct): too few to split into {k_min}+ subdomains")
    scores: dict[int, float] = {}
    fits: dict[int, np.ndarray] = {}
    for k in range(k_min, top + 1):
        labels = KMeans(n_clusters=k, random_state=seed, n_init=4).fit(x).labels_
        if len(set(labels)) < 2:
            continue
        scores[k], fits[k] = float(silhouette_score(x, labels)), labels.astype(int)
    if not scores:
        return SubdomainSplit(np.zeros(len(x), dtype=int), 1, {}, "k-means found a single cluster")
    best = max(scores, key=lambda k: (scores[k], -k))
    return SubdomainSplit(fits[best], best, scores, f"k={best}: highest mean silhouette of k in {sorted(scores)}")


def latent_embedding(latent: np.ndarray, grid: int = 4) -> np.ndarray:
    """An offline item embedding from its latent (T, H, W, C): per-channel means over a grid x grid spatial layout
    plus channel standard deviations, L2-normalised (the demo has no CLIP)."""
    lat = np.asarray(latent, dtype=np.float32).mean(axis=0)  # (H, W, C)
    h, w, _ = lat.shape
    rows = np.array_split(np.arange(h), min(grid, h))
    cols = np.array_split(np.arange(w), min(grid, w))
    cells = [lat[np.ix_(r, c)].mean(axis=(0, 1)) for r in rows for c in cols]
    vec = np.concatenate([*cells, lat.reshape(-1, lat.shape[-1]).std(axis=0)])
    return vec / (np.linalg.norm(vec) + 1e-8)

"""Perceptual-hash deduplication: pHash for images, a video hash (pHash of evenly spaced frames) for scenes.

Rows within the Hamming radius are grouped (union-find); each group keeps its best member, ranked by: passes the
other filters, larger short side, higher technical quality, more bytes per pixel (less compression).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from k5data.curation.filters import gray


def phash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash (Zauner 2010): 32x32 grey, low 8x8 DCT block against its median."""
    import cv2

    small = cv2.resize(gray(rgb), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # median without the DC term, which only carries brightness
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def video_hash(frames: list[np.ndarray]) -> list[int]:
    return [phash(f) for f in frames]


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def video_distance(a: list[int], b: list[int]) -> float:
    """Mean per-frame Hamming distance of two video hashes (aligned on relative position)."""
    if not a or not b:
        return 64.0
    n = min(len(a), len(b))
    ia = np.linspace(0, len(a) - 1, n).round().astype(int)
    ib = np.linspace(0, len(b) - 1, n).round().astype(int)
    return float(np.mean([hamming(a[i], b[j]) for i, j in zip(ia, ib)]))


def _rank(row: dict[str, Any]) -> tuple:
    pixels = max(1, row["width"] * row["height"])
    others_ok = not [r for r in row.get("_reasons", []) if r != "duplicate"]
    return (others_ok, min(row["width"], row["height"]), row.get("quality_technical") or 0.0,
            (row.get("size") or 0) / pixels, row["media_id"])


def find_duplicates(rows: list[dict[str, Any]], image_radius: int, video_radius: float) -> dict[int, int]:
    """Map row position -> position of the kept member, for every row that duplicates a better one.

    Pairwise within each kind; fine for a shard or a demo corpus. At production scale the same radius query runs
    against a vector / BK-tree index in the catalog database (report §4.1)."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = rows[i], rows[j]
            if a["kind"] != b["kind"] or a.get("hash") is None or b.get("hash") is None:
                continue
            if a["kind"] == "image":
                close = hamming(a["hash"][0], b["hash"][0]) <= image_radius
            else:
                close = video_distance(a["hash"], b["hash"]) <= video_radius
            if close:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(find(i), []).append(i)
    dup_of: dict[int, int] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        keep = max(members, key=lambda k: _rank(rows[k]))
        dup_of.update({m: keep for m in members if m != keep})
    return dup_of

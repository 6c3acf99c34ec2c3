"""Visual complexity (report §4.2): Sobel edge density plus a segmentation-based region count; rejects overly
simple frames (plain backgrounds). Default segmenter: Felzenszwalb graph segmentation from scikit-image
("heuristic-sobel+felzenszwalb-v1"); production: SAM 2 automatic masks (``sam2`` backend, local model folder)."""

from __future__ import annotations

from typing import Any

import numpy as np

from k5data.curation.filters import Item, gray, resize_long, result


def edge_density(rgb: np.ndarray) -> float:
    import cv2

    g = gray(resize_long(rgb, 256)).astype(np.float32)
    mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
    return float((mag > 100.0).mean())


def segment_count(rgb: np.ndarray) -> int:
    from skimage.segmentation import felzenszwalb

    small = resize_long(rgb, 256)
    labels = felzenszwalb(small, scale=100, sigma=0.8, min_size=50)
    sizes = np.bincount(labels.ravel())
    return int((sizes >= 0.005 * labels.size).sum())  # regions of at least 0.5 % of the frame


def score_complexity(item: Item, cfg: dict[str, Any], segmenter: Any = None) -> dict[str, Any]:
    frame = item.middle
    edges = edge_density(frame)
    if cfg["backend"] == "heuristic":
        regions, backend = segment_count(frame), "heuristic-sobel+felzenszwalb-v1"
    else:
        regions, backend = segmenter.count(frame), f"sobel+{segmenter.name}"
    score = 0.5 * min(1.0, edges / 0.15) + 0.5 * min(1.0, np.log1p(regions) / np.log1p(50))
    return result("complexity", score, backend, score >= cfg["min_score"], "too_simple",
                  complexity_edges=edges, complexity_regions=regions)

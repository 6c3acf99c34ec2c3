"""Watermark probability, averaged over 5 evenly spaced frames (report §4.4).

No watermark classifier installs offline, so the default is a documented heuristic ("heuristic-border-text-v1"):
watermarks and channel logos are text/logo marks near the frame border, so the probability grows with the area of
detected text boxes, border boxes counting fully and central ones half; boxes covering more than a quarter of the
frame are detector artefacts, not marks.

Production (``models``, report §4.2/§4.4): a watermark classifier AND a detector of watermark-like objects, each
averaged over the 5 frames; the row is flagged when EITHER exceeds its threshold (``max_prob`` for the classifier,
``max_detector_score`` for the detector). ``hf-image-classifier`` runs the classifier alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from k5data.curation.filters import Item, result
from k5data.curation.filters.text_area import cached_boxes

BORDER = 0.2     # outer band (fraction of width/height) where marks usually sit
AREA_SCALE = 0.01  # 1 % of the frame as border text -> p = 0.63


def border_text_probability(boxes: np.ndarray, height: int, width: int) -> float:
    weighted = 0.0
    for box in boxes:
        x0, y0 = box.min(axis=0)
        x1, y1 = box.max(axis=0)
        area = max(0.0, (x1 - x0) * (y1 - y0)) / (width * height)
        if area > 0.25:
            continue
        near_border = (x0 < BORDER * width or x1 > (1 - BORDER) * width or y0 < BORDER * height
                       or y1 > (1 - BORDER) * height)
        weighted += area * (1.0 if near_border else 0.5)
    return float(1.0 - np.exp(-weighted / AREA_SCALE))


def score_watermark(item: Item, cfg: dict[str, Any], classifier: Any = None, detector: Any = None) -> dict[str, Any]:
    frames = item.get(item.wm)
    if cfg["backend"] == "heuristic":
        probs = [border_text_probability(cached_boxes(item, i), *item.frames[i].shape[:2]) for i in item.wm]
        p = float(np.mean(probs))
        return result("watermark", p, "heuristic-border-text-v1", p <= cfg["max_prob"], "watermark")
    if cfg["backend"] not in ("hf-image-classifier", "models"):
        raise ValueError(f"unknown watermark backend {cfg['backend']!r} (heuristic | hf-image-classifier | models)")
    cls_p = float(np.mean(classifier.probabilities(frames))) if classifier is not None else None
    det_p = (float(np.mean(detector.label_scores(frames, cfg["detector_labels"])))
             if detector is not None and cfg["backend"] == "models" else None)
    if cls_p is None and det_p is None:
        raise ValueError("watermark backend 'models' needs filters.watermark.model_path (classifier) and/or "
                         "filters.watermark.detector_path (detector)")
    fired = (cls_p is not None and cls_p > cfg["max_prob"]) or (
        det_p is not None and det_p > cfg["max_detector_score"])
    backend = "+".join(m.name for m in (classifier, detector) if m is not None)
    score = max(v for v in (cls_p, det_p) if v is not None)
    return result("watermark", score, backend, not fired, "watermark", watermark_classifier=cls_p,
                  watermark_detector=det_p)

"""Watermark probability, averaged over 5 evenly spaced frames (report §4.4).

No watermark classifier installs offline, so the default is a documented heuristic ("heuristic-border-text-v1"):
watermarks and channel logos are text/logo marks near the frame border, so the probability grows with the area of
detected text boxes, border boxes counting fully and central ones half; boxes covering more than a quarter of the
frame are detector artefacts, not marks. Production: ``hf-image-classifier`` with a local watermark classifier.
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


def score_watermark(item: Item, cfg: dict[str, Any], classifier: Any = None) -> dict[str, Any]:
    if cfg["backend"] == "heuristic":
        probs = []
        for index in item.wm:
            frame = item.frames[index]
            probs.append(border_text_probability(cached_boxes(item, index), *frame.shape[:2]))
        backend = "heuristic-border-text-v1"
    else:
        probs = [classifier.probability(f) for f in item.get(item.wm)]
        backend = classifier.name
    p = float(np.mean(probs))
    return result("watermark", p, backend, p <= cfg["max_prob"], "watermark")

"""Text area (report §4.2/§4.4): text boxes and the fraction of the frame they cover, averaged over 3 evenly
spaced frames of a scene. Backend: the PP-OCR DB text detector through the ``rapidocr`` package's own loader, the model
that ships inside the wheel or, with ``model_path``, a local ONNX detector file (production: the server-size
PP-OCR det; the report's CRAFT has no loader that installs here, see docs/curation.md)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from k5data.curation.filters import Item, result

_ENGINES: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _engine(limit_side_len: int, box_thresh: float = 0.75, model_path: str | None = None) -> Any:
    from rapidocr import RapidOCR

    key = ("rapidocr", limit_side_len, box_thresh, model_path)
    if model_path is not None and not Path(model_path).is_file():
        raise FileNotFoundError(f"text_area: detector model file {model_path!r} not found (filters.text_area."
                                "model_path: a local PP-OCR det .onnx, or null for the one in the rapidocr wheel)")
    with _LOCK:
        if key not in _ENGINES:
            # Detection only; "max" caps the long side so small and large frames cost about the same.
            _ENGINES[key] = RapidOCR(params={"Global.use_cls": False, "Global.use_rec": False,
                                             "Global.log_level": "critical", "Det.limit_type": "max",
                                             "Det.limit_side_len": limit_side_len,
                                             "Det.box_thresh": box_thresh,
                                             **({"Det.model_path": model_path} if model_path else {})})
        return _ENGINES[key]


def detect_boxes(rgb: np.ndarray, limit_side_len: int = 640, box_thresh: float = 0.75,
                 model_path: str | None = None) -> np.ndarray:
    """Quadrilateral text boxes (N, 4, 2) in pixel coordinates of ``rgb``."""
    engine = _engine(limit_side_len, box_thresh, model_path)
    out = engine(np.ascontiguousarray(rgb[..., ::-1]), use_det=True, use_cls=False, use_rec=False)
    boxes = getattr(out, "boxes", None)
    return np.zeros((0, 4, 2), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4, 2)


def cached_boxes(item: Item, index: int) -> np.ndarray:
    """Boxes of one frame, computed once per item (the watermark heuristic reuses them)."""
    cache = item.cache.setdefault("text_boxes", {})
    if index not in cache:
        cache[index] = detect_boxes(item.frames[index], *item.cache.get("text_det", (640, 0.75)))
    return cache[index]


def box_mask(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    mask = np.zeros(shape, np.uint8)
    if len(boxes):
        cv2.fillPoly(mask, [b.round().astype(np.int32) for b in boxes], 1)
    return mask


def score_text_area(item: Item, cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg["backend"] != "rapidocr":
        raise ValueError(f"unknown text_area backend {cfg['backend']!r}")
    # score.py sets this per run; a direct call gets the section's own detector settings
    item.cache.setdefault("text_det", (cfg["limit_side_len"], cfg["box_thresh"], cfg.get("model_path")))
    counts, areas = [], []
    for index in item.text:
        boxes = cached_boxes(item, index)
        counts.append(len(boxes))
        areas.append(float(box_mask(boxes, item.frames[index].shape[:2]).mean()))  # union, not sum of boxes
    area, n = float(np.mean(areas)), float(np.mean(counts))
    ok = n <= cfg["max_boxes"] and area <= cfg["max_area"]
    backend = f"rapidocr-det:{Path(cfg['model_path']).name}" if cfg.get("model_path") else "rapidocr-ppocr-det"
    return result("text_area", area, backend, ok, "too_much_text", text_boxes=n)

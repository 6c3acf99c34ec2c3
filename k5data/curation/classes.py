"""Object and scene classes of a row (report §4.1/§4.4): a detector's object labels over the watermark frames (5 per
scene, 1 per image) and a CLIP zero-shot classifier's location, style, main subject and place, with the label sets
from the config (``classes``). Metadata columns for conditional sampling and analysis; they reject nothing.
Backend ``none`` (the default config) leaves the columns empty and loads no model."""

from __future__ import annotations

from collections import Counter
from typing import Any

from k5data.curation.filters import Item

SCENE_KEYS = ("location", "style", "subject", "place")
EMPTY = {"objects": None, "objects_backend": "none", "scene_backend": "none",
         **{f"scene_{k}": None for k in SCENE_KEYS}}


def object_labels(item: Item, detector: Any, cfg: dict[str, Any]) -> str:
    """Labels found in any sampled frame, most frequent (then best-scoring) first, as ``label:count`` joined by
    commas; the count is the largest number of boxes of that label in one frame."""
    per_frame = detector.detect(item.get(item.wm), min_score=cfg["min_score"])
    counts: Counter[str] = Counter()
    best: dict[str, float] = {}
    for dets in per_frame:
        frame_counts = Counter(label for label, _ in dets)
        for label, n in frame_counts.items():
            counts[label] = max(counts[label], n)
        for label, score in dets:
            best[label] = max(best.get(label, 0.0), score)
    ranked = sorted(counts, key=lambda lab: (-counts[lab], -best[lab], lab))[: cfg["max_labels"]]
    return ",".join(f"{lab}:{counts[lab]}" for lab in ranked)


def classify(item: Item, cfg: dict[str, Any], detector: Any = None, zero_shot: Any = None) -> dict[str, Any]:
    """The class columns of one row (``objects``, ``scene_<key>`` for each configured label set)."""
    out = dict(EMPTY)
    if detector is not None:
        out["objects"], out["objects_backend"] = object_labels(item, detector, cfg["objects"]), detector.name
    if zero_shot is not None:
        for key, (label, _) in zero_shot.classify(item.get(item.wm)).items():
            out[f"scene_{key}"] = label
        out["scene_backend"] = zero_shot.name
    return out

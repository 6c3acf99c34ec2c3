"""Technical and aesthetic quality. Production backends are local image classifiers (TOPIQ / Q-Align / DOVER
exports, ``hf-image-classifier``); the offline default is a documented heuristic:

* technical ("heuristic-technical-v1"): sharpness (variance of the Laplacian), noise (Immerkaer's estimator),
  JPEG/codec blockiness (gradient jump across the 8-px grid) and exposure clipping, each mapped to [0, 1] and
  combined as a weighted GEOMETRIC mean, so one severe defect (a blurred or flat frame, a heavy re-encode) sinks
  the score; an arithmetic mean gave such frames 0.6 from the three intact terms and never crossed the threshold;
* aesthetic ("heuristic-aesthetic-v1"): colourfulness (Hasler & Suesstrunk), global contrast and exposure balance.
Overall = w * technical + (1 - w) * aesthetic, as DOVER's weighted sum (report §4.4). Video: mean over frames.

``models`` (production): images through two image classifiers (TOPIQ-class technical and aesthetic heads, the
probability of their positive label), video scenes through a DOVER-class clip regressor (outputs ``technical`` and
``aesthetic``, squashed with a sigmoid so the same thresholds apply), and, when ``qalign.model_path`` is set, the
Q-Align readout of a Qwen2.5-VL (1..5) with its own thresholds and reasons (``low_qalign_quality``,
``low_qalign_aesthetic``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from k5data.curation.filters import Item, gray, resize_long, result


def technical(rgb: np.ndarray) -> float:
    import cv2

    g = gray(resize_long(rgb, 512)).astype(np.float64)
    sharp = 1.0 - np.exp(-cv2.Laplacian(g, cv2.CV_64F).var() / 400.0)
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    h, w = g.shape
    sigma = np.sqrt(np.pi / 2) * np.abs(cv2.filter2D(g, -1, kernel)[1:-1, 1:-1]).sum() / (6 * (w - 2) * (h - 2))
    noise = np.exp(-sigma / 8.0)
    dx = np.abs(np.diff(gray(rgb).astype(np.float64), axis=1))
    if dx.shape[1] > 16:
        grid = dx[:, 7::8].mean()
        off = np.delete(dx, np.s_[7::8], axis=1).mean()
        # clean photos sit at a ratio of ~1.0-1.07, a JPEG at quality 30 at ~1.3-1.8, quality 5 at ~2.4-5.6
        block = float(np.exp(-max(0.0, grid / max(off, 1e-6) - 1.0) * 6.0))
    else:
        block = 1.0
    clipped = float(((g <= 2) | (g >= 253)).mean())
    exposure = 1.0 - min(1.0, clipped * 3.0)
    terms = np.array([sharp, noise, block, exposure]).clip(1e-6, 1.0)
    return float(np.exp(np.dot([0.4, 0.2, 0.2, 0.2], np.log(terms))))


def aesthetic(rgb: np.ndarray) -> float:
    x = resize_long(rgb, 512).astype(np.float64)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    colourful = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    g = x.mean(axis=2)
    return float(0.4 * min(1.0, colourful / 80.0) + 0.3 * min(1.0, g.std() / 64.0)
                 + 0.3 * (1.0 - abs(g.mean() - 128.0) / 128.0))


def _model_scores(item: Item, frames: list[np.ndarray], models: dict[str, Any]) -> tuple[float, float, str]:
    video = models.get("video")
    if item.kind == "video" and video is not None:
        out = video.scores([item.frames[i] for i in sorted(item.frames)])
        tech, aes = (1.0 / (1.0 + np.exp(-out[k])) for k in ("technical", "aesthetic"))
        return float(tech), float(aes), video.name
    tech = float(np.mean(models["technical"].probabilities(frames)))
    aes = float(np.mean(models["aesthetic"].probabilities(frames)))
    return tech, aes, f"{models['technical'].name}+{models['aesthetic'].name}"


def score_quality(item: Item, cfg: dict[str, Any], models: dict[str, Any] | None = None) -> dict[str, Any]:
    frames = item.get(item.wm)
    models = models or {}
    extra: dict[str, Any] = {}
    if cfg["backend"] == "heuristic":
        tech = float(np.mean([technical(f) for f in frames]))
        aes = float(np.mean([aesthetic(f) for f in frames]))
        backend = "heuristic-technical-v1+heuristic-aesthetic-v1"
    elif cfg["backend"] in ("hf-image-classifier", "models"):
        tech, aes, backend = _model_scores(item, frames, models)
    else:
        raise ValueError(f"unknown quality backend {cfg['backend']!r} (heuristic | hf-image-classifier | models)")
    w = cfg["technical_weight"]
    overall = w * tech + (1 - w) * aes
    failed = []
    if tech < cfg["min_technical"]:
        failed.append("low_technical_quality")
    if aes < cfg["min_aesthetic"]:
        failed.append("low_aesthetic_quality")
    if models.get("qalign") is not None:
        from k5data.curation.vlm import qalign_scores

        qa, qcfg = qalign_scores(models["qalign"], frames), cfg["qalign"]
        extra = {"quality_qalign": qa["quality"], "quality_qalign_aesthetic": qa["aesthetic"]}
        backend += f"+qalign:{models['qalign'].name}"
        if qa["quality"] < qcfg["min_quality"]:
            failed.append("low_qalign_quality")
        if qa["aesthetic"] < qcfg["min_aesthetic"]:
            failed.append("low_qalign_aesthetic")
    return result("quality", overall, backend, not failed, failed[0] if failed else None, quality_technical=tech,
                  quality_aesthetic=aes, **extra)

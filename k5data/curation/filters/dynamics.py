"""Structural dynamics (report §4.4): MS-SSIM between consecutive frames sampled at 2 FPS, averaged per scene.
High mean = static scene, low mean = chaotic; both ends are rejected by thresholds from the config."""

from __future__ import annotations

from typing import Any

import numpy as np

from k5data.curation.filters import Item, gray, resize_short, result

# Wang, Simoncelli & Bovik (2003) scale weights.
WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])


def _ssim_parts(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    import cv2

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return float(np.mean(lum * cs)), float(np.mean(cs))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM of two grey images of equal size (5 scales; contrast-structure terms clipped at 0)."""
    import cv2

    x, y = a.astype(np.float64), b.astype(np.float64)
    values = []
    for level in range(len(WEIGHTS)):
        ssim, cs = _ssim_parts(x, y)
        values.append(max(ssim if level == len(WEIGHTS) - 1 else cs, 0.0))
        if level < len(WEIGHTS) - 1:
            x = cv2.resize(x, (x.shape[1] // 2, x.shape[0] // 2), interpolation=cv2.INTER_AREA)
            y = cv2.resize(y, (y.shape[1] // 2, y.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return float(np.prod(np.power(values, WEIGHTS)))


def score_dynamics(item: Item, cfg: dict[str, Any]) -> dict[str, Any]:
    if item.kind != "video":
        return result("dynamics", None, "n/a-image", True)
    frames = [gray(resize_short(f, cfg["side"])) for f in item.get(item.dyn)]
    if len(frames) < 2:
        return result("dynamics", None, "msssim", False, "too_few_frames")
    score = float(np.mean([ms_ssim(a, b) for a, b in zip(frames[:-1], frames[1:])]))
    if score > cfg["max_msssim"]:
        return result("dynamics", score, "msssim", False, "too_static")
    if score < cfg["min_msssim"]:
        return result("dynamics", score, "msssim", False, "too_dynamic")
    return result("dynamics", score, "msssim", True)

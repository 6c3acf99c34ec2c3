"""Per-row filters. Each returns a dict of columns ``<name>_score``, ``<name>_backend``, ``<name>_passed`` (plus
extras such as ``text_boxes``); the reject reason of a failed filter is its name (e.g. ``too_static``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Item:
    """One image or one video scene with the decoded frames every filter samples from."""

    kind: str                           # image | video
    width: int
    height: int
    frames: dict[int, np.ndarray]       # frame index -> RGB uint8 (an image is frame 0)
    fps: float | None = None
    dyn: list[int] = field(default_factory=list)    # frames at the dynamics rate (2 FPS), video only
    text: list[int] = field(default_factory=lambda: [0])   # 3 evenly spaced frames for text area
    wm: list[int] = field(default_factory=lambda: [0])     # 5 evenly spaced frames for watermark
    hash: list[int] = field(default_factory=lambda: [0])   # frames of the video hash
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # shared results (text boxes per frame)

    def get(self, indices: list[int]) -> list[np.ndarray]:
        return [self.frames[i] for i in indices if i in self.frames]

    @property
    def middle(self) -> np.ndarray:
        keys = sorted(self.frames)
        return self.frames[keys[len(keys) // 2]]


def result(name: str, score: float | None, backend: str, passed: bool, reason: str | None = None,
           **extra: Any) -> dict[str, Any]:
    """Standard columns of one filter; ``reason`` is recorded only when the filter failed."""
    out: dict[str, Any] = {f"{name}_score": None if score is None else float(score), f"{name}_backend": backend,
                           f"{name}_passed": bool(passed), f"{name}_reason": None if passed else (reason or name)}
    out.update({k: (float(v) if isinstance(v, np.floating) else v) for k, v in extra.items()})
    return out


def gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def resize_short(img: np.ndarray, side: int) -> np.ndarray:
    """Resize so the short side is ``side`` (MS-SSIM / optical flow work at a fixed scale)."""
    import cv2

    h, w = img.shape[:2]
    scale = side / min(h, w)
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def resize_long(img: np.ndarray, side: int) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)

"""Geometric verification of a candidate pair (report §4.3 steps 4, 6, 7).

* matches: SIFT / ORB (OpenCV, ratio test) or LoFTR (kornia; weights from a local checkpoint);
* inlier groups: RANSAC fundamental matrices found one after another on the matches left over, while a group has
  at least ``min_group`` points; ``inliers`` is the sum over the groups;
* a RANSAC similarity ("Euclidean" plus scale: crops change scale) transform maps the target into the source;
* aligned crops: the target warped into the source frame, both cut to the overlap's bounding box (for aligned DINO);
* overlap analysis: the fraction of the target's area that lands inside the source UNCHANGED (mean absolute
  difference under ``changed_level``); near 1 means the target is a plain crop / copy of the source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    inliers: int
    """Sum of the inlier groups' sizes."""
    groups: list[int]
    """Sizes of the fundamental-matrix inlier groups."""
    matches: int
    transform: np.ndarray | None
    """2x3 similarity transform target -> source (match_side pixels), None when it could not be estimated."""
    overlap: float
    """Fraction of the target's area inside the source and unchanged there (0 without a transform)."""
    changed_box: tuple[float, float, float, float] | None
    """Bounding box (x0, y0, x1, y1, fractions of the source) of the changed pixels inside the overlap."""
    source_crop: np.ndarray | None
    target_crop: np.ndarray | None
    """The aligned overlap of both images (RGB), for the aligned-DINO score."""


def resize_long(rgb: np.ndarray, side: int) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    s = side / max(h, w)
    if abs(s - 1) < 1e-3:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


class OpenCVMatcher:
    def __init__(self, kind: str = "sift") -> None:
        import cv2

        if kind == "sift":
            self.detector, self.norm = cv2.SIFT_create(nfeatures=4000), cv2.NORM_L2
        elif kind == "orb":
            self.detector, self.norm = cv2.ORB_create(nfeatures=4000), cv2.NORM_HAMMING
        else:
            raise ValueError(f"matcher {kind!r} is not one of sift, orb, loftr")
        self.name = f"opencv-{kind}"

    def match(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Matched point coordinates (N, 2) in ``a`` and in ``b`` (x, y pixels)."""
        import cv2

        ka, da = self.detector.detectAndCompute(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), None)
        kb, db = self.detector.detectAndCompute(cv2.cvtColor(b, cv2.COLOR_RGB2GRAY), None)
        if da is None or db is None or len(ka) < 2 or len(kb) < 2:
            return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
        pairs = cv2.BFMatcher(self.norm).knnMatch(da, db, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
        pa = np.float32([ka[m.queryIdx].pt for m in good]).reshape(-1, 2)
        pb = np.float32([kb[m.trainIdx].pt for m in good]).reshape(-1, 2)
        return pa, pb


class LoFTRMatcher:
    """kornia's LoFTR (outdoor config). ``weights``: a local checkpoint (``state_dict`` or a dict holding one);
    None builds random weights, which the tests use to run the same code path."""

    def __init__(self, weights: str | None, confidence: float = 0.5) -> None:
        import torch
        from kornia.feature import LoFTR

        self.model = LoFTR(pretrained=None).eval()
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state.get("state_dict", state))
        self.confidence = confidence
        self.name = "kornia-loftr" + ("" if weights else "-random")
        self._torch = torch

    def match(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        def tensor(rgb: np.ndarray) -> object:
            g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            h, w = g.shape[0] // 8 * 8, g.shape[1] // 8 * 8  # LoFTR works on a 1/8 grid
            return self._torch.from_numpy(g[:h, :w].astype(np.float32) / 255.0)[None, None]

        with self._torch.no_grad():
            out = self.model({"image0": tensor(a), "image1": tensor(b)})
        keep = (out["confidence"] >= self.confidence).numpy()
        return out["keypoints0"].numpy()[keep], out["keypoints1"].numpy()[keep]


def make_matcher(kind: str, loftr_weights: str | None = None) -> OpenCVMatcher | LoFTRMatcher:
    return LoFTRMatcher(loftr_weights) if kind == "loftr" else OpenCVMatcher(kind)


def inlier_groups(pa: np.ndarray, pb: np.ndarray, ransac_px: float, min_group: int, max_groups: int) -> list[int]:
    """Sizes of fundamental-matrix inlier groups found one after another on the remaining matches."""
    import cv2

    groups: list[int] = []
    left = np.arange(len(pa))
    while len(groups) < max_groups and len(left) >= max(min_group, 8):
        f, mask = cv2.findFundamentalMat(pa[left], pb[left], cv2.FM_RANSAC, ransac_px, 0.999, 2000)
        if f is None or mask is None:
            break
        inl = mask.ravel().astype(bool)
        if inl.sum() < min_group:
            break
        groups.append(int(inl.sum()))
        left = left[~inl]
    return groups


def verify(source: np.ndarray, target: np.ndarray, matcher: OpenCVMatcher | LoFTRMatcher, *, match_side: int = 640,
           ransac_px: float = 3.0, min_group: int = 20, max_groups: int = 5,
           changed_level: float = 0.1) -> Geometry:
    """Match, group, align and analyse the overlap of one pair (images of any size)."""
    import cv2

    src, tgt = resize_long(source, match_side), resize_long(target, match_side)
    ps, pt = matcher.match(src, tgt)
    groups = inlier_groups(ps, pt, ransac_px, min_group, max_groups)
    none = Geometry(sum(groups), groups, len(ps), None, 0.0, None, None, None)
    if len(ps) < 3:
        return none
    m, mask = cv2.estimateAffinePartial2D(pt, ps, method=cv2.RANSAC, ransacReprojThreshold=ransac_px)
    if m is None or mask is None or int(mask.sum()) < min_group:
        return none
    h, w = src.shape[:2]
    warped = cv2.warpAffine(tgt, m, (w, h), flags=cv2.INTER_AREA)
    inside = cv2.warpAffine(np.ones(tgt.shape[:2], np.uint8), m, (w, h), flags=cv2.INTER_NEAREST).astype(bool)
    if not inside.any():
        return none
    diff = np.abs(warped.astype(np.float32) - src.astype(np.float32)).mean(axis=2) / 255.0
    changed = inside & (diff > changed_level)
    target_area = tgt.shape[0] * tgt.shape[1] * abs(float(np.linalg.det(m[:, :2])))  # in source pixels
    overlap = float((inside & ~changed).sum() / max(target_area, 1.0))
    ys, xs = np.nonzero(inside)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = None
    if changed.any():
        cy, cx = np.nonzero(changed)
        box = (cx.min() / w, cy.min() / h, (cx.max() + 1) / w, (cy.max() + 1) / h)
    return Geometry(sum(groups), groups, len(ps), m, min(overlap, 1.0), box,
                    np.ascontiguousarray(src[y0:y1, x0:x1]), np.ascontiguousarray(warped[y0:y1, x0:x1]))

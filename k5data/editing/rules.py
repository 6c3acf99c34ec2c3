"""Report Table 1 as one pure function of a pair's scores (tested with given scores; the mining feeds it measured
ones). Exclusions are checked first, in a fixed order, so every dropped pair carries exactly one reason:

1. ``near_duplicate``: dino_sim > exclude_dino;
2. ``simple_crop``: overlap analysis, the target lies unchanged inside the source over > max_overlap of its area;
3. ``aligned_near_duplicate``: DINO of the aligned overlapping crops > exclude_aligned_dino;
4. ``face_mismatch``: 0 < face_sim < exclude_face (two different people);
then the keep rules, first match wins: ``dino_inliers`` (dino_sim > 0.8 and inliers > 300), ``clip_inliers``
(clip_sim > 0.8, inliers > 200 and the per-cluster adaptive condition), ``face`` (face_sim > 0.7); otherwise
``no_rule``."""

from __future__ import annotations

from dataclasses import dataclass

from k5data.editing.config import RuleThresholds

DROP_REASONS = ("near_duplicate", "simple_crop", "aligned_near_duplicate", "face_mismatch", "no_rule")
KEEP_RULES = ("dino_inliers", "clip_inliers", "face")


@dataclass(frozen=True)
class PairScores:
    clip_sim: float
    dino_sim: float
    face_sim: float
    """0.0 when either image has no single face."""
    aligned_dino_sim: float
    """0.0 when the pair could not be aligned."""
    inliers: int
    overlap: float
    """Unchanged fraction of the target inside the source (0 when not aligned)."""
    clip_thr: float
    """The pair's per-cluster CLIP threshold."""


@dataclass(frozen=True)
class Decision:
    kept: bool
    rule: str | None
    drop_reason: str | None


def adaptive_ok(clip_sim: float, clip_thr: float, t: float) -> bool:
    """The report's adaptive CLIP condition clip_sim > (1 - T) * clip_thr + T."""
    return clip_sim > (1.0 - t) * clip_thr + t


def decide(s: PairScores, r: RuleThresholds) -> Decision:
    """Table 1 on one pair."""
    if s.dino_sim > r.exclude_dino:
        return Decision(False, None, "near_duplicate")
    if s.overlap > r.max_overlap:
        return Decision(False, None, "simple_crop")
    if s.aligned_dino_sim > r.exclude_aligned_dino:
        return Decision(False, None, "aligned_near_duplicate")
    if 0.0 < s.face_sim < r.exclude_face:
        return Decision(False, None, "face_mismatch")
    if s.dino_sim > r.dino_min and s.inliers > r.dino_inliers:
        return Decision(True, "dino_inliers", None)
    if s.clip_sim > r.clip_min and s.inliers > r.clip_inliers and adaptive_ok(s.clip_sim, s.clip_thr, r.adaptive_t):
        return Decision(True, "clip_inliers", None)
    if s.face_sim > r.face_min:
        return Decision(True, "face", None)
    return Decision(False, None, "no_rule")

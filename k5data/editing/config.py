"""Typed configuration of the editing-pair mining, shared by the Dagster assets and ``k5 edit-pairs``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(kw_only=True, frozen=True)
class RuleThresholds:
    """Report Table 1 thresholds (a pair is kept by the first keep rule that holds and no exclusion)."""

    dino_min: float = 0.8
    """DINO rule: dino_sim above this ..."""
    dino_inliers: int = 300
    """... and more geometric inliers than this."""
    clip_min: float = 0.8
    """CLIP rule: clip_sim above this, the per-cluster adaptive condition ..."""
    clip_inliers: int = 200
    """... and more inliers than this."""
    face_min: float = 0.7
    """Face rule: both images hold one face each and face_sim is above this."""
    exclude_dino: float = 0.97
    """Exclusion: near-duplicates (dino_sim above this)."""
    exclude_aligned_dino: float = 0.97
    """Exclusion: DINO similarity of the aligned overlapping crops above this."""
    exclude_face: float = 0.5
    """Exclusion: 0 < face_sim < this (two different people)."""
    max_overlap: float = 0.95
    """Overlap analysis: a pair whose target lies unchanged inside the source over more than this fraction of its
    area is a simple crop (or copy) and is dropped."""
    adaptive_t: float = 0.15
    """T of the adaptive CLIP condition clip_sim > (1 - T) * clip_thr + T."""


@dataclass(kw_only=True, frozen=True)
class EditMiningConfig:
    """Everything the mining needs besides its input dataset and output location."""

    clip_backend: str = "thumbnail"
    """"thumbnail" (offline colour/layout features, the default of the demo) or "clip" (CLIP vision model folder)."""
    clip_model_path: str | None = None
    """Local CLIP folder (``from_pretrained``; nothing is downloaded) when clip_backend is "clip"."""
    dino_backend: str = "thumbnail"
    """"thumbnail" (normalised grey thumbnail: cross-correlation) or "dinov2" (DINOv2 folder)."""
    dino_model_path: str | None = None
    """Local DINOv2 folder when dino_backend is "dinov2"."""
    face_backend: str = "thumbnail"
    """Faces are found with scikit-image's LBP frontal-face cascade; their crops are embedded by "thumbnail" (HOG of
    the 64x64 grey crop) or "hf" (any transformers image model folder, e.g. a ViT face-recognition export)."""
    face_model_path: str | None = None
    """Local face-embedding folder when face_backend is "hf"."""
    face_rules: bool | None = None
    """Apply Table 1's face rules (``face_mismatch``, ``face``) to face_sim. None: only with face_backend "hf". The
    thumbnail backend's HOG does not tell people apart: against one face, other people's faces score in the same
    range as that face's own edits (docs/editing.md). Its face_sim is recorded, but the rules read it as "no
    faces"."""
    neighbours: int = 8
    """Nearest neighbours searched per image in each index (CLIP and DINO)."""
    min_candidate_sim: float = 0.8
    """A neighbour becomes a candidate pair when its CLIP or DINO similarity is at least this (the lowest keep
    threshold of Table 1's CLIP and DINO rules: a pair under it on both can only be a face pair, and those are
    neighbours too)."""
    hnsw_m: int = 16
    """HNSW graph degree of the FAISS indexes."""
    hnsw_ef_search: int = 32
    """HNSW search breadth (recall against work)."""
    clip_thr_quantile: float = 0.5
    """clip_thr of a cluster: this quantile of its members' top-k neighbour CLIP similarities (report: "thresholds
    were determined per cluster based on top similarity scores"); a pair must beat (1 - T) * clip_thr + T, i.e.
    be closer than the cluster's typical near neighbours."""
    include_rejected: tuple[str, ...] = ("duplicate",)
    """Curated image rows rejected ONLY for these reasons are still mined: an edit is often a pHash near-duplicate
    of its source, which curation drops from text-to-image training but which is exactly an editing candidate."""
    matcher: str = "sift"
    """Geometric verification matcher: "sift" / "orb" (OpenCV) or "loftr" (kornia LoFTR, weights from
    loftr_weights)."""
    loftr_weights: str | None = None
    """Local LoFTR checkpoint (a ``state_dict`` file) for matcher "loftr"; None = random weights (tests only)."""
    match_side: int = 640
    """Images are resized to this long side before matching."""
    ransac_px: float = 3.0
    """RANSAC reprojection threshold in pixels (at match_side)."""
    min_group: int = 20
    """Minimum inliers of one fundamental-matrix group; groups are found until one is smaller."""
    max_groups: int = 5
    """At most this many inlier groups per pair."""
    changed_level: float = 0.1
    """Overlap analysis: an aligned pixel whose mean absolute difference exceeds this (0..1) is changed."""
    instruction_backend: str = "caption-diff"
    """"caption-diff" (offline: the changed region and the target's caption) or "qwen2_5_vl" (local VLM folder
    ``instruction_model_path`` sees source and target side by side)."""
    instruction_model_path: str | None = None
    """Local Qwen2.5-VL folder for instruction_backend "qwen2_5_vl"."""
    instruction_max_new_tokens: int = 64
    """Token budget of one VLM instruction."""
    sft_min_qalign: float = 4.0
    """SFT subset: the target's Q-Align technical score (1-5 scale) above this ..."""
    sft_min_aesthetic: float = 2.0
    """... and its Q-Align aesthetic score (1-5 scale) above this. The curated dataset stores probabilities in
    [0, 1] (quality_technical / quality_aesthetic); they map to Q-Align's 5 levels as 1 + 4 * p."""
    rules: RuleThresholds = field(default_factory=RuleThresholds)
    """Table 1 thresholds."""

    @property
    def applies_face_rules(self) -> bool:
        """Whether face_sim decides anything (``face_rules``, or by default an identity-capable face backend)."""
        return self.face_backend == "hf" if self.face_rules is None else self.face_rules

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> EditMiningConfig:
        """From a mapping (run config, YAML); unknown keys are refused by name."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown editing-mining settings {unknown}; known: {sorted(known)}")
        rules = values.pop("rules", None)
        if isinstance(rules, dict):
            rule_names = {f.name for f in fields(RuleThresholds)}
            bad = sorted(set(rules) - rule_names)
            if bad:
                raise ValueError(f"unknown Table 1 thresholds {bad}; known: {sorted(rule_names)}")
            values["rules"] = RuleThresholds(**rules)
        if "include_rejected" in values:
            values["include_rejected"] = tuple(values["include_rejected"])
        return cls(**values)


def load_mining_config(path: str | None) -> EditMiningConfig:
    """The defaults, or a YAML file of ``EditMiningConfig`` fields (``rules:`` a mapping of ``RuleThresholds``)."""
    if not path:
        return EditMiningConfig()
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of editing-mining settings, got {type(values).__name__}")
    return EditMiningConfig.from_dict(values)

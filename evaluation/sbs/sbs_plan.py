"""Annotation plan for one SBS batch: who sees which pair, on which side, in which order (pure, seeded).

* every comparison item goes to ``overlap`` distinct annotators (report §8.2: overlap 5), balanced by load;
* every golden pair (identical media, or one side clearly degraded) goes to every annotator, so golden accuracy
  is measured per annotator;
* left/right is drawn per assignment (not per item) and recorded, so a side bias of one rater cannot correlate
  with a model; the order of each annotator's queue is shuffled with the golden pairs mixed in.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from evaluation.sbs.sbs_scores import PF_CRITERIA, VISUAL_CRITERIA

# Image pairs have no time axis, so the temporal visual criteria (5 transitions, 6 dynamism, 7 motion, 8 face
# consistency over time, 11 semantic breaks over time) are not asked for them.
_TEMPORAL = {"visual_5", "visual_6", "visual_7", "visual_8", "visual_11"}


def criteria_for(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(phase 1 visual criteria, phase 2 prompt-following criteria) asked for a media ``kind``."""
    if kind == "video":
        return VISUAL_CRITERIA, PF_CRITERIA
    if kind == "image":
        return tuple(c for c in VISUAL_CRITERIA if c not in _TEMPORAL), PF_CRITERIA
    raise ValueError(f"unknown media kind {kind!r}")


@dataclass(frozen=True)
class PlanItem:
    """One pair. ``media_a``/``media_b`` are paths relative to the batch's media root."""

    item_id: str
    prompt: str
    media_a: str
    media_b: str
    kind: str = "video"
    golden: str | None = None  # None, "identical" or "degraded"
    better: str | None = None  # for degraded golden pairs: the intact side, "A" or "B"
    seed: int | None = None


@dataclass(frozen=True)
class Assignment:
    annotator: str
    item_id: str
    a_on_left: bool
    position: int  # 0-based place in this annotator's queue


@dataclass
class Plan:
    items: list[PlanItem]
    assignments: list[Assignment]
    overlap: int
    seed: int
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"items": [asdict(i) for i in self.items],
                           "assignments": [asdict(a) for a in self.assignments],
                           "overlap": self.overlap, "seed": self.seed, "meta": self.meta}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        return cls(items=[PlanItem(**i) for i in d["items"]],
                   assignments=[Assignment(**a) for a in d["assignments"]],
                   overlap=int(d["overlap"]), seed=int(d["seed"]), meta=d.get("meta", {}))

    def for_annotator(self, annotator: str) -> list[Assignment]:
        return sorted((a for a in self.assignments if a.annotator == annotator), key=lambda a: a.position)

    def golden_map(self) -> dict[str, tuple[str, str | None]]:
        return {i.item_id: (i.golden, i.better) for i in self.items if i.golden}


def build_plan(items: Sequence[PlanItem], annotators: Sequence[str], overlap: int = 5, seed: int = 0) -> Plan:
    """Assign each non-golden item to ``overlap`` distinct annotators (least-loaded first, random tie-break), every
    golden item to every annotator, sides drawn per assignment, each queue shuffled. Deterministic for a seed."""
    annotators = list(dict.fromkeys(annotators))
    if overlap < 1:
        raise ValueError("overlap must be >= 1")
    if overlap > len(annotators):
        raise ValueError(f"overlap {overlap} needs at least {overlap} annotators, got {len(annotators)}")
    ids = [i.item_id for i in items]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate item ids")
    rng = random.Random(seed)
    load = {a: 0 for a in annotators}
    queues: dict[str, list[str]] = {a: [] for a in annotators}
    for item in items:
        if item.golden:
            chosen = list(annotators)
        else:
            # least-loaded first; the random key breaks ties so no annotator is systematically favoured
            chosen = sorted(annotators, key=lambda a: (load[a], rng.random()))[:overlap]
        for a in chosen:
            load[a] += 1
            queues[a].append(item.item_id)
    assignments: list[Assignment] = []
    for a in annotators:
        queue = queues[a]
        rng.shuffle(queue)
        assignments.extend(Assignment(a, item_id, rng.random() < 0.5, pos) for pos, item_id in enumerate(queue))
    return Plan(items=list(items), assignments=assignments, overlap=overlap, seed=seed)


def coverage(plan: Plan) -> dict[str, int]:
    """Distinct annotators per item (the asset check compares this with the planned overlap)."""
    seen: dict[str, set[str]] = {i.item_id: set() for i in plan.items}
    for a in plan.assignments:
        seen.setdefault(a.item_id, set()).add(a.annotator)
    return {k: len(v) for k, v in seen.items()}


def under_covered(per_item: dict[str, int], overlap: int, golden: Iterable[str] = ()) -> dict[str, int]:
    """Items (golden excluded) with fewer than ``overlap`` distinct annotators."""
    skip = set(golden)
    return {k: n for k, n in per_item.items() if k not in skip and n < overlap}


def golden_specs(n_identical: int, n_degraded: int, seed: int = 0) -> list[tuple[str, str | None]]:
    """Kinds of the golden pairs to mix in: [(kind, intact side)], the intact side of a degraded pair drawn at
    random so that "always pick A" does not pass the check."""
    rng = random.Random(seed)
    return [("identical", None)] * n_identical + [("degraded", rng.choice("AB")) for _ in range(n_degraded)]


def degrade_frames(frames: np.ndarray, seed: int = 0, strength: float = 1.0) -> np.ndarray:
    """A clearly worse copy of uint8 frames (F, H, W, 3) or (H, W, 3): 4x down/up-sampling (blur), strong noise and
    a colour cast. Meant to be obvious to any attentive rater."""
    x = np.asarray(frames)
    if x.dtype != np.uint8:
        raise ValueError("frames must be uint8")
    rng = np.random.default_rng(seed)
    f = x.astype(np.float32)
    h, w = f.shape[-3], f.shape[-2]
    k = 4
    # block-average then repeat: cheap, dependency-free blur
    hh, ww = (h // k) * k, (w // k) * k
    core = f[..., :hh, :ww, :]
    small = core.reshape(*core.shape[:-3], hh // k, k, ww // k, k, 3).mean(axis=(-4, -2))
    blurred = f.copy()
    blurred[..., :hh, :ww, :] = np.repeat(np.repeat(small, k, axis=-3), k, axis=-2)
    noisy = blurred + rng.normal(0.0, 40.0 * strength, size=f.shape) + np.array([30.0, -20.0, 10.0]) * strength
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

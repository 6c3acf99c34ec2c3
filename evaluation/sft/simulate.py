"""Seeded simulated annotators for the SFT task (demo and tests), writing through the store like the app does.

Each item has a latent quality ``z ~ N(0, 1)`` and each criterion a difficulty, both derived from the seed and the
ids, so a re-run gives the same answers. A rater answers from ``z - difficulty + bias + noise`` (bias per rater,
noise per answer): options are ordered best first, and the score picks one by evenly spaced cut points. Descriptive
questions get an item-level answer most raters share. Accounts are named ``simulated:*`` by convention (nobody can log
in as them: they get no password), so simulated answers stay recognisable in the store and the datasets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from evaluation.sft.questionnaire import EXPERT, REGULAR, STAGE_EXPERT, STAGE_SCREENING, Question, questions_for
from evaluation.sft.store import SftStore

SIMULATED_PREFIX = "simulated:"


@dataclass(frozen=True, kw_only=True)
class SimulatedRaters:
    """How the simulated annotators behave."""

    seed: int = 0
    """Seed of every draw (items, criteria, raters, answers)."""
    screening_pass_rate_shift: float = 1.0
    """Added to an item's quality in Stage 1: higher lets more items through screening."""
    rater_bias_sd: float = 0.3
    """Spread of the raters' leniency."""
    noise_sd: float = 0.5
    """Per-answer noise: lower means more agreement between raters."""
    expert_leniency: float = 0.1
    """Added to an item's quality in Stage 2: higher makes "good" answers more common."""


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _pick(q: Question, score: float) -> str:
    # n options best-first; cut points evenly spaced on [-1.5, 0]: score > 0 -> best ... score < -1.5 -> worst
    cuts = np.linspace(0.0, -1.5, len(q.options) - 1)
    return q.options[int(np.sum(score < cuts))]


def simulated_answer(sim: SimulatedRaters, annotator: str, item_id: str, stage: int, q: Question) -> str:
    """The answer of one simulated rater to one question (deterministic)."""
    quality = float(_rng(sim.seed, "item", item_id).standard_normal())
    if q.descriptive:
        shared = _rng(sim.seed, "attr", item_id, q.key).integers(len(q.options))
        deviate = _rng(sim.seed, "attr-rater", annotator, item_id, q.key).random() < 0.2
        return q.options[int(_rng(sim.seed, "attr-other", annotator, item_id, q.key).integers(len(q.options)))
                         if deviate else int(shared)]
    difficulty = float(_rng(sim.seed, "criterion", q.key).normal(0.0, 0.4))
    bias = float(_rng(sim.seed, "rater", annotator).normal(0.0, sim.rater_bias_sd))
    noise = float(_rng(sim.seed, "answer", annotator, item_id, stage, q.key).normal(0.0, sim.noise_sd))
    shift = sim.screening_pass_rate_shift if stage == STAGE_SCREENING else sim.expert_leniency
    score = quality - difficulty + bias + noise + shift
    if stage == STAGE_SCREENING:
        return q.options[0] if score > 0 else q.options[1]
    return _pick(q, score)


def simulate_annotation(store: SftStore, sim: SimulatedRaters, prefix: str = SIMULATED_PREFIX) -> dict[str, int]:
    """Fill the Stage 1 queues of the regular accounts named ``prefix*``, which decides the screening and assigns
    experts, then the Stage 2 queues of the expert accounts named ``prefix*``. Idempotent (answers already there
    stay). Returns answers written per stage."""
    items = store.items_frame().set_index("item_id")
    written = {}
    for stage, role in ((STAGE_SCREENING, REGULAR), (STAGE_EXPERT, EXPERT)):
        rows = []
        for name in store.annotators_with_role(role):
            if not name.startswith(prefix):
                continue
            for item_id in store.assigned(name, stage):
                it = items.loc[item_id]
                for q in questions_for(stage, it["kind"], bool(it["has_text"])):
                    rows.append((name, item_id, stage, q.key, simulated_answer(sim, name, item_id, stage, q)))
        written[f"stage{stage}_answers"] = len(store.answer_many(rows))
    return written

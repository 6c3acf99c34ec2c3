"""Consensus of the expert questionnaires -> SFT dataset membership (report §4.6, "Quality Thresholds"), and
inter-rater agreement per criterion.

How we read the report's v1 rule, "consensus among evaluators (minimum 3/2 agreement on 'good' ratings across all
parameters)": "3/2" is read as "2 of 3" -- each item is rated by at least 3 experts, and on EVERY consensus criterion
at least two thirds of the experts who answered it chose a "good" option (2 of 3, 3 of 4, 4 of 6). A literal 3/2 > 1
cannot be a share of raters, and "two of three experts agree" is the usual majority-of-three protocol. The defaults
are ``v1_min_experts = 3`` and ``v1_min_good = 2/3``.

v2 (relaxed, "optimized thresholds"): ``v2_min_good`` (default 1/2) per criterion, with up to
``v2_max_failed_criteria`` criteria (default 2) allowed below it, from ``v2_min_experts`` (default 2) experts. The
config refuses v2 thresholds stricter than v1's, so v1 ⊆ v2 always holds. Both require a passed Stage 1.

Descriptive questions (video dynamics, complexity, poster category) are not part of the consensus; their majority
answer is kept per item as an attribute.

Agreement: Krippendorff's alpha (nominal) per criterion, on the binary "good / not good" value the consensus uses
(Stage 2) and "pass / fail" (Stage 1). Alpha handles any number of raters per item and missing answers, which the
least-loaded assignment produces; units with a single answer carry no pairing information and are left out. Alpha is
undefined (None) when every answer is the same value.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from itertools import permutations

import pandas as pd

from evaluation.sft.questionnaire import STAGE_EXPERT, STAGE_SCREENING, consensus_questions, question, questions_for


@dataclass(frozen=True, kw_only=True)
class ConsensusConfig:
    """Thresholds of the two dataset versions (module docstring)."""

    v1_min_experts: int = 3
    """v1: experts who must have answered every consensus criterion of the item."""
    v1_min_good: float = 2 / 3
    """v1: share of "good" answers every consensus criterion needs (the report's 2-of-3 reading)."""
    v2_min_experts: int = 2
    """v2: experts needed (<= v1_min_experts)."""
    v2_min_good: float = 0.5
    """v2: share of "good" a criterion needs to count as passed (<= v1_min_good)."""
    v2_max_failed_criteria: int = 2
    """v2: criteria allowed below ``v2_min_good`` (>= 0)."""

    def __post_init__(self) -> None:
        for name in ("v1_min_good", "v2_min_good"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")
        if self.v2_min_experts < 1 or self.v2_max_failed_criteria < 0:
            raise ValueError("v2_min_experts must be >= 1 and v2_max_failed_criteria >= 0")
        if (self.v2_min_good > self.v1_min_good + 1e-12 or self.v2_min_experts > self.v1_min_experts):
            raise ValueError(f"v2 must relax v1: v2_min_good={self.v2_min_good} <= v1_min_good={self.v1_min_good} "
                             f"and v2_min_experts={self.v2_min_experts} <= v1_min_experts={self.v1_min_experts}")


def item_consensus(items: pd.DataFrame, answers: pd.DataFrame, cfg: ConsensusConfig) -> pd.DataFrame:
    """One row per item: ``n_experts``, ``criteria_good`` (JSON {criterion: share good}), ``min_good_fraction``,
    ``failed_criteria`` (below v2_min_good), ``attributes`` (JSON {descriptive criterion: majority answer}),
    ``stage1_passed``, ``in_v1``, ``in_v2``. ``items`` is ``SftStore.items_frame()``, ``answers`` its
    ``answers_frame(stage=2)``."""
    by_item: dict[str, dict[str, dict[str, str]]] = {}  # item -> criterion -> annotator -> answer
    for item_id, annotator, criterion, ans in zip(answers["item_id"], answers["annotator"], answers["criterion"],
                                                  answers["answer"]):
        by_item.setdefault(item_id, {}).setdefault(criterion, {})[annotator] = ans
    rows = []
    for it in items.itertuples(index=False):
        crit = [q.key for q in consensus_questions(it.kind, bool(it.has_text))]
        descriptive = [q.key for q in questions_for(STAGE_EXPERT, it.kind, bool(it.has_text)) if q.descriptive]
        got = by_item.get(it.item_id, {})
        shares = {key: sum(a in question(key).good for a in got[key].values()) / len(got[key])
                  for key in crit if got.get(key)}
        attributes = {key: Counter(got[key].values()).most_common(1)[0][0] for key in descriptive if got.get(key)}
        finished = set.intersection(*(set(got.get(key, {})) for key in crit)) if crit else set()
        n_experts = len(finished)
        complete = len(shares) == len(crit)
        min_good = min(shares.values()) if complete else 0.0
        failed = sum(v < cfg.v2_min_good for v in shares.values()) + (len(crit) - len(shares))
        stage1 = bool(it.stage1_passed) if pd.notna(it.stage1_passed) else False
        in_v1 = stage1 and complete and n_experts >= cfg.v1_min_experts and min_good >= cfg.v1_min_good - 1e-12
        in_v2 = stage1 and complete and n_experts >= cfg.v2_min_experts and failed <= cfg.v2_max_failed_criteria
        rows.append({"item_id": it.item_id, "n_experts": n_experts, "criteria_good": json.dumps(shares, sort_keys=True),
                     "min_good_fraction": float(min_good), "failed_criteria": int(failed),
                     "attributes": json.dumps(attributes, sort_keys=True), "stage1_passed": stage1,
                     "in_v1": bool(in_v1), "in_v2": bool(in_v2)})
    return pd.DataFrame(rows, columns=["item_id", "n_experts", "criteria_good", "min_good_fraction",
                                       "failed_criteria", "attributes", "stage1_passed", "in_v1", "in_v2"])


def krippendorff_alpha_nominal(units: list[list[object]]) -> float | None:
    """Krippendorff's alpha for nominal data; ``units`` holds each item's answers (any number per item). Units with
    fewer than two answers are left out. None when undefined (fewer than two pairable values or no variation)."""
    coincidence: Counter[tuple[object, object]] = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for a, b in permutations(range(m), 2):
            coincidence[(values[a], values[b])] += 1.0 / (m - 1)
    n_c: Counter[object] = Counter()
    for (c, _), w in coincidence.items():
        n_c[c] += w
    n = sum(n_c.values())
    if n < 2:
        return None
    observed = sum(w for (c, k), w in coincidence.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n - 1)
    if expected == 0:
        return None
    return float(1.0 - observed / expected)


def agreement_by_criterion(answers: pd.DataFrame) -> dict[str, dict[str, float | int | None]]:
    """{criterion: {"alpha": Krippendorff's alpha on good/not-good, "items": items with >= 2 answers, "answers": n}}
    for every criterion present in ``answers`` (both stages; module docstring)."""
    out: dict[str, dict[str, float | int | None]] = {}
    if not len(answers):
        return out
    for key, group in answers.groupby("criterion"):
        good = question(key).good
        units = [[a in good for a in g["answer"]] for _, g in group.groupby("item_id")]
        alpha = krippendorff_alpha_nominal(units)
        out[str(key)] = {"alpha": None if alpha is None else round(alpha, 4),
                         "items": sum(len(u) >= 2 for u in units), "answers": int(len(group)),
                         "stage": STAGE_SCREENING if int(group["stage"].iloc[0]) == STAGE_SCREENING else STAGE_EXPERT}
    return out

"""The release gate: does a side-by-side comparison show that a candidate beats the current champion?

Input: an SBS summary (``evaluation.sbs.sbs_scores.full_summary`` plus the report's ``model_a``/``model_b``/
``simulated`` keys), whose ``ci95_diff[group]`` is the paired percentile-bootstrap interval of S1 - S2 (model 1 =
model A). For the candidate's side the advantage interval is that interval (candidate = A) or its mirror (candidate
= B). Rule, per configured overall group: pass iff the interval's lower bound is above ``margin``; promote iff every
configured group passes.

Who the candidate must beat:
- a champion exists: the comparison's other side must BE the champion; an SBS against any other model says nothing
  about the champion, so the gate keeps it (and says which comparison to run);
- no champion yet: the comparison's other side is the baseline, and the candidate becomes the first champion only
  if it beats that baseline by the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

OVERALL_GROUPS: tuple[str, ...] = ("overall_visual_quality", "overall_motion", "overall_prompt_following")


def lineage_name(name: str) -> str:
    """Canonical lineage model name: ``stage:<stage>`` or ``folder:<path>``; a bare stage name gets ``stage:``."""
    return name if ":" in name else f"stage:{name}"


@dataclass(frozen=True)
class GroupVerdict:
    group: str
    passed: bool
    reason: str
    candidate_score: float | None = None
    baseline_score: float | None = None
    advantage: float | None = None  # candidate - baseline, point estimate
    interval: tuple[float, float] | None = None  # 95 % bootstrap interval of the advantage


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str  # one line: the decision and why
    candidate: str
    baseline: str | None  # the model the comparison measured the candidate against
    champion: str | None  # the champion at decision time (None: no champion yet)
    margin: float
    comparison: str | None = None
    simulated: bool = False
    groups: tuple[GroupVerdict, ...] = field(default_factory=tuple)

    @property
    def decision(self) -> str:
        return "promote" if self.promote else "keep"

    def lines(self) -> list[str]:
        """Human-readable: the decision line, then one line per group."""
        return [f"{self.decision}: {self.reason}", *(f"- {g.group}: {g.reason}" for g in self.groups)]


def _group_verdict(summary: dict, group: str, side: str, margin: float) -> GroupVerdict:
    scores, diff = summary.get(group), (summary.get("ci95_diff") or {}).get(group)
    if not scores:
        return GroupVerdict(group, False, "no ratings in this group")
    other = "model2" if side == "model1" else "model1"
    cand, base = float(scores[side]), float(scores[other])
    if diff is None:
        return GroupVerdict(group, False, "the summary has no paired interval (ci95_diff); re-materialize sbs_report",
                            cand, base, cand - base)
    low, high = (float(diff[0]), float(diff[1])) if side == "model1" else (-float(diff[1]), -float(diff[0]))
    passed = low > margin
    verb = "above" if passed else "not above"
    reason = (f"candidate {cand:.3f} vs {base:.3f}, advantage {cand - base:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}]: "
              f"lower bound {verb} margin {margin:+.3f}")
    return GroupVerdict(group, passed, reason, cand, base, cand - base, (low, high))


def decide(summary: dict, *, candidate: str, champion: str | None, margin: float = 0.0,
           groups: Sequence[str] = OVERALL_GROUPS, allow_simulated: bool = True) -> GateDecision:
    """Promote or keep ``candidate`` (a lineage name, e.g. ``stage:video_lite_mr_10s``) given the SBS ``summary`` and
    the current ``champion``'s lineage name (None: no champion yet)."""
    unknown = [g for g in groups if g not in OVERALL_GROUPS]
    if unknown or not groups:
        raise ValueError(f"gate groups {list(groups)}: choose one or more of {list(OVERALL_GROUPS)}")
    cand = lineage_name(candidate)
    sides = {lineage_name(str(summary.get(k, ""))): s for k, s in (("model_a", "model1"), ("model_b", "model2"))}
    simulated = bool(summary.get("simulated", False))
    base_info = dict(candidate=cand, champion=lineage_name(champion) if champion else None, margin=margin,
                     comparison=summary.get("comparison"), simulated=simulated)
    if cand not in sides:
        return GateDecision(False, f"the comparison ({' vs '.join(sides)}) does not include the candidate {cand}",
                            baseline=None, **base_info)
    side = sides[cand]
    baseline = next(name for name, s in sides.items() if s != side)
    if champion and lineage_name(champion) != baseline:
        return GateDecision(False, f"the comparison measures {cand} against {baseline}, not against the champion "
                            f"{lineage_name(champion)}; run an SBS of the candidate against the champion",
                            baseline=baseline, **base_info)
    verdicts = tuple(_group_verdict(summary, g, side, margin) for g in groups)
    against = f"the champion {baseline}" if champion else f"the baseline {baseline} (no champion yet)"
    failed = [v.group for v in verdicts if not v.passed]
    label = " (simulated judgments)" if simulated else ""
    if simulated and not allow_simulated:
        return GateDecision(False, f"judgments are simulated{label}; the gate requires human judgments",
                            baseline=baseline, groups=verdicts, **base_info)
    if failed:
        reason = f"does not beat {against} by more than {margin:+.3f} on {', '.join(failed)}{label}"
    else:
        reason = f"beats {against} by more than {margin:+.3f} on {', '.join(groups)}{label}"
    return GateDecision(not failed, reason, baseline=baseline, groups=verdicts, **base_info)

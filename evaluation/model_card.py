"""Markdown model card of a release: lineage, data, side-by-side scores with intervals, latency, gate decision.

The card is the registered version's description and an artifact of its release run. The gate section sits between
markers so the ``champion_gate`` check can replace it once it has decided (``with_gate``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.release_gate import OVERALL_GROUPS, GateDecision

GATE_START, GATE_END = "<!-- gate -->", "<!-- /gate -->"


@dataclass(frozen=True, kw_only=True)
class ReleaseLineage:
    """Where a release comes from; MLflow OSS cannot log model inputs, so these become version tags."""

    family: str
    """Model family (``k5model.training.stages.CHAINS`` key), e.g. ``video_lite``."""
    stage: str
    """The Table 4 stage whose pipeline folder is released."""
    stages: tuple[str, ...]
    """The chain from its root down to ``stage`` (Figure 18)."""
    training_run_ids: dict[str, str] = field(default_factory=dict)
    """MLflow run id of each trained stage of ``stages`` that recorded one."""
    dataset_snapshot: str | None = None
    """Curated dataset version the stage trained on."""
    shard_index_uri: str | None = None
    """Latent shard index the stage read."""
    data: dict[str, Any] = field(default_factory=dict)
    """Data consumed (samples, tokens, ...), as the stage recorded it."""
    comparison: str | None = None
    """SBS comparison (``sbs_report`` partition) that gates the release."""
    dagster_run_id: str | None = None
    """Dagster run that registered the release."""

    @property
    def parent_stage(self) -> str | None:
        return self.stages[-2] if len(self.stages) > 1 else None

    @property
    def lineage_name(self) -> str:
        # the SFT soup and the distilled models are the SBS registry's ``sft:soup`` / ``distill:<asset>`` models
        # (evaluation.sbs.comparisons)
        named = {"sft_soup": "sft:soup", "rl_model": "rl:rl",
                 **{a: f"distill:{a}" for a in ("cfg_distilled", "tscd_16nfe", "flash")}}
        return named.get(self.stage, f"stage:{self.stage}")


def _fmt(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:.3f}" if isinstance(x, float) else str(x)


def _sbs_section(summary: dict | None) -> list[str]:
    if not summary:
        return ["## Side-by-side evaluation", "", "No SBS summary was given."]
    a, b = summary.get("model_a", "model 1"), summary.get("model_b", "model 2")
    judged = "**simulated** judgments (demo)" if summary.get("simulated") else "human judgments"
    out = ["## Side-by-side evaluation", "",
           f"Comparison `{summary.get('comparison', '?')}`: `{a}` (model 1) vs `{b}` (model 2), "
           f"{summary.get('n_items', '?')} prompts, {summary.get('n_judgments', '?')} {judged}. Scores: report §8.2; "
           "intervals: 95% percentile bootstrap over prompts (paired for the difference).", "",
           "| group | model 1 | 95% CI | model 2 | 95% CI | model 1 - model 2 | 95% CI |",
           "|---|---|---|---|---|---|---|"]
    ci, diff = summary.get("ci95", {}), summary.get("ci95_diff", {})

    def iv(pair: Any) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else "—"

    for group in OVERALL_GROUPS:
        s = summary.get(group)
        if not s:
            out.append(f"| {group} | no ratings | | | | | |")
            continue
        c = ci.get(group, {})
        out.append(f"| {group} | {s['model1']:.3f} | {iv(c.get('model1'))} | {s['model2']:.3f} | "
                   f"{iv(c.get('model2'))} | {s['model1'] - s['model2']:+.3f} | {iv(diff.get(group))} |")
    for key in ("pairwise_agreement", "krippendorff_alpha"):
        if summary.get(key) is not None:
            out.append(f"\n{key.replace('_', ' ').capitalize()}: {summary[key]:.3f}")
    return out


def gate_section(decision: GateDecision | None) -> str:
    if decision is None:
        body = "Pending: the `champion_gate` check decides whether this version becomes `champion`."
    else:
        body = "\n".join([f"**{decision.decision}** (margin {decision.margin:+.3f}): {decision.reason}", "",
                          *(f"- `{g.group}`: {'pass' if g.passed else 'fail'}, {g.reason}" for g in decision.groups)])
    return f"{GATE_START}\n## Release gate\n\n{body}\n{GATE_END}"


def with_gate(card: str, decision: GateDecision) -> str:
    """``card`` with its gate section replaced by ``decision`` (appended when the card has none)."""
    pattern = re.compile(re.escape(GATE_START) + ".*?" + re.escape(GATE_END), re.S)
    new = gate_section(decision)
    return pattern.sub(lambda _: new, card) if pattern.search(card) else f"{card.rstrip()}\n\n{new}\n"


def render_model_card(*, name: str, lineage: ReleaseLineage, source_uri: str, manifest_sha256: str,
                      total_bytes: int, summary: dict | None = None, latency: dict[str, float] | None = None,
                      decision: GateDecision | None = None) -> str:
    """The card as markdown. ``latency``: label -> seconds (e.g. ``{"5 s clip, 50 steps, H100": 135.7}``)."""
    runs = [f"| {s} | {'`' + lineage.training_run_ids[s] + '`' if s in lineage.training_run_ids else '—'} |"
            for s in lineage.stages]
    data = [f"- Dataset snapshot: `{lineage.dataset_snapshot or 'not recorded'}`",
            f"- Shard index: `{lineage.shard_index_uri or 'not recorded'}`",
            *(f"- {k.replace('_', ' ')}: {_fmt(v)}" for k, v in sorted(lineage.data.items()))]
    lines = [f"# {name}: {lineage.stage}", "",
             f"Kandinsky 5 `{lineage.family}` release of stage `{lineage.stage}`"
             f" (parent `{lineage.parent_stage or 'none'}`).", "",
             f"- Source: `{source_uri}` ({total_bytes:,} bytes, immutable)",
             f"- Manifest sha256: `{manifest_sha256}`",
             f"- Dagster run: `{lineage.dagster_run_id or '—'}`", "",
             "## Lineage", "", "| stage | MLflow run |", "|---|---|", *runs, "",
             "## Data", "", *data, "", *_sbs_section(summary), "", "## Latency", ""]
    lines += [f"- {k}: {v:.3f} s" for k, v in latency.items()] if latency else ["Not measured for this release."]
    return "\n".join(lines) + "\n\n" + gate_section(decision) + "\n"


def measure_latency(folder: Path, *, size: int = 64, frames: int = 5, steps: int = 4, device: str = "cpu",
                    prompt: str = "a red fox running through snow") -> dict[str, float]:
    """Seconds of one generation (text encoding, ``steps`` Euler steps, VAE decode; model load excluded) with the
    pipeline folder through ``K5Pipeline``: the card's latency line, labelled with what was measured. The side rounds
    up to the model's size multiple (NABLA models: 128 px)."""
    from k5model.pipeline import K5Pipeline

    pipe = K5Pipeline.from_pretrained(folder, device=device)
    side = -(-size // pipe.size_multiple) * pipe.size_multiple
    n = frames if pipe.is_video else None
    result = pipe.generate(prompt, height=side, width=side, num_frames=n, num_steps=steps, seed=0, progress=False)
    label = f"{side}x{side}" + (f"x{n} frames" if n else "") + f", {steps} steps, {device}"
    return {label: float(result.timings["total_s"])}

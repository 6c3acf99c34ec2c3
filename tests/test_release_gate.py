"""The release gate on real SBS summaries (``full_summary`` of synthetic judgment tables): promote and keep, the
no-champion rule, the candidate on either side, and the paired bootstrap interval it reads; the model card."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evaluation.model_card import ReleaseLineage, render_model_card, with_gate
from evaluation.release_gate import OVERALL_GROUPS, decide, lineage_name
from evaluation.sbs.sbs_scores import (
    ALL_CRITERIA,
    M1,
    M2,
    bootstrap_difference_intervals,
    bootstrap_intervals,
    full_summary,
)

A, B = "stage:video_lite_mr_10s", "stage:video_lite_t2i_lr"


def judgments(p_a: float, items: int = 24, annotators: int = 3, seed: int = 0) -> pd.DataFrame:
    """Every criterion of every item judged by each annotator: model 1 better with probability ``p_a``."""
    rng = np.random.default_rng(seed)
    rows = [(f"i{i}", f"ann{k}", c, M1 if rng.random() < p_a else M2)
            for i in range(items) for k in range(annotators) for c in ALL_CRITERIA]
    return pd.DataFrame(rows, columns=["item_id", "annotator", "criterion", "choice"])


def summary(p_a: float, model_a: str = A, model_b: str = B, simulated: bool = False, **kw) -> dict:
    s = full_summary(judgments(p_a, **kw), n_boot=300)
    return {**s, "comparison": "video_lite_mr_10s_vs_video_lite_t2i_lr", "model_a": model_a, "model_b": model_b,
            "simulated": simulated}


def test_difference_interval_is_paired_and_signed() -> None:
    df = judgments(0.7)
    diff = bootstrap_difference_intervals(df, n_boot=400, seed=3)
    per_model = bootstrap_intervals(df, n_boot=400, seed=3)
    g = "overall_visual_quality"
    low, high = diff[g].low, diff[g].high
    assert 0 < low < high  # A clearly better
    # S1 + S2 = 1 here (no ties), so D = 2 S1 - 1 replicate by replicate: the interval maps exactly
    m1 = per_model[g]["model1"]
    assert (low, high) == pytest.approx((2 * m1.low - 1, 2 * m1.high - 1))
    flipped = df.assign(choice=df["choice"].map({M1: M2, M2: M1}))
    mirror = bootstrap_difference_intervals(flipped, n_boot=400, seed=3)[g]
    assert (mirror.low, mirror.high) == pytest.approx((-high, -low))
    assert bootstrap_difference_intervals(df.iloc[:0]) == {}


def test_no_champion_candidate_must_beat_baseline() -> None:
    strong = decide(summary(0.8), candidate=A, champion=None, margin=0.1)
    assert strong.promote and strong.decision == "promote"
    assert "no champion yet" in strong.reason and strong.baseline == B
    assert all(g.passed and g.interval[0] > 0.1 for g in strong.groups)
    # the same comparison with a margin the lower bound does not clear: keep, and say by how much per group
    strict = decide(summary(0.8), candidate=A, champion=None, margin=0.9)
    assert not strict.promote and strict.decision == "keep"
    assert "does not beat the baseline" in strict.reason
    assert all("not above margin +0.900" in g.reason for g in strict.groups)
    tie = decide(summary(0.5), candidate=A, champion=None, margin=0.0)
    assert not tie.promote and all(g.interval[0] < 0 for g in tie.groups)  # no advantage: lower bounds below 0


def test_champion_must_be_the_comparisons_other_side() -> None:
    s = summary(0.8)
    assert decide(s, candidate=A, champion=B).promote  # beats the champion itself
    other = decide(s, candidate=A, champion="stage:video_lite_lr")
    assert not other.promote and "not against the champion stage:video_lite_lr" in other.reason and not other.groups
    missing = decide(s, candidate="stage:video_lite_lr", champion=None)
    assert not missing.promote and "does not include the candidate" in missing.reason


def test_candidate_on_the_b_side_reads_the_mirrored_interval() -> None:
    s = summary(0.2, model_a=B, model_b=A)  # A (the candidate) is model 2 and wins
    d = decide(s, candidate="video_lite_mr_10s", champion="video_lite_t2i_lr", margin=0.05)  # bare names accepted
    assert d.promote and d.candidate == A and d.champion == B
    vq = d.groups[0]
    assert vq.candidate_score == pytest.approx(s["overall_visual_quality"]["model2"])
    assert vq.interval == pytest.approx((-s["ci95_diff"]["overall_visual_quality"][1],
                                         -s["ci95_diff"]["overall_visual_quality"][0]))


def test_groups_simulated_and_bad_input() -> None:
    s = summary(0.8, simulated=True)
    d = decide(s, candidate=A, champion=None, groups=["overall_motion"])
    assert d.promote and [g.group for g in d.groups] == ["overall_motion"] and "(simulated judgments)" in d.reason
    assert not decide(s, candidate=A, champion=None, allow_simulated=False).promote
    no_pf = {**s, "overall_prompt_following": None}
    pf = decide(no_pf, candidate=A, champion=None)
    assert not pf.promote and pf.groups[2].reason == "no ratings in this group"
    old = {k: v for k, v in s.items() if k != "ci95_diff"}
    assert "re-materialize sbs_report" in decide(old, candidate=A, champion=None).groups[0].reason
    with pytest.raises(ValueError, match="overall_visual_quality"):
        decide(s, candidate=A, champion=None, groups=["visual_1"])
    assert lineage_name("x") == "stage:x" and lineage_name("folder:/a/b") == "folder:/a/b"


def test_model_card_sections_and_gate_replacement() -> None:
    lineage = ReleaseLineage(family="video_lite", stage="video_lite_mr_10s",
                             stages=("video_lite_t2i_lr", "video_lite_lr", "video_lite_mr_5s", "video_lite_mr_10s"),
                             training_run_ids={"video_lite_mr_10s": "abc123"}, dataset_snapshot="curated@v3",
                             shard_index_uri="file:///s/index.parquet", data={"samples": 120, "tokens": 4_000_000},
                             comparison="video_lite_mr_10s_vs_video_lite_t2i_lr")
    s = summary(0.8, simulated=True)
    card = render_model_card(name="k5-video_lite", lineage=lineage, source_uri="s3://b/releases/video_lite/0123",
                             manifest_sha256="f" * 64, total_bytes=1234, summary=s, latency={"64x64x5, 2 steps": 0.5})
    for needle in ("# k5-video_lite: video_lite_mr_10s", "parent `video_lite_mr_5s`", "`abc123`", "curated@v3",
                   "tokens: 4,000,000", "**simulated** judgments", "overall_motion", "0.500 s", "Pending"):
        assert needle in card, needle
    vq = s["ci95_diff"]["overall_visual_quality"]
    assert f"[{vq[0]:.3f}, {vq[1]:.3f}]" in card
    decided = with_gate(card, decide(s, candidate=A, champion=None))
    assert "Pending" not in decided and "**promote**" in decided and decided.count("## Release gate") == 1
    again = with_gate(decided, decide(s, candidate=A, champion=None, margin=0.9))
    assert "**keep**" in again and "**promote**" not in again
    assert set(OVERALL_GROUPS) <= {g.group for g in decide(s, candidate=A, champion=None).groups}

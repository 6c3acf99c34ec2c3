"""Report §8.2 formulas on hand-worked judgment tables (every expected number is worked out in the comments)."""

from __future__ import annotations

import pandas as pd
import pytest

from evaluation.sbs.sbs_scores import (
    allowed_choices,
    bootstrap_intervals,
    choice_distribution,
    full_summary,
    golden_accuracy,
    krippendorff_alpha,
    krippendorff_alpha_nominal,
    pairwise_agreement,
    score_judgments,
    split_valid,
    unswap_choice,
)


def table(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["item_id", "annotator", "criterion", "choice"])


def votes(item: str, criterion: str, choices: list[str]) -> list[tuple[str, str, str, str]]:
    return [(item, f"r{i}", criterion, c) for i, c in enumerate(choices)]


def test_option_sets_match_report() -> None:
    assert allowed_choices("visual_1") == (
        "model1_better", "model2_better", "equally", "model1_better_unconfident", "model2_better_unconfident")
    assert allowed_choices("visual_9") == allowed_choices("visual_1")
    assert allowed_choices("visual_10") == ("model1_better", "model2_better", "both_correct", "equally")
    assert allowed_choices("visual_11") == allowed_choices("visual_10")
    assert allowed_choices("pf_action_properties") == (
        "model1_better", "model2_better", "both_correct", "both_incorrect", "equally")


def test_visual_1_9_formula_with_unconfident_and_ties() -> None:
    # i1: M1 .4, Eq .2, M1u .2, M2 .2 -> S1 = .4 + .2/2 + .2/2 = .6 ; S2 = .2 + 0 + .2/2 = .3
    # i2: M2u 1.0                     -> S1 = 0 ; S2 = .5
    # mean over items: S1 = .3, S2 = .4
    df = table(votes("i1", "visual_1", ["model1_better", "model1_better", "equally", "model1_better_unconfident",
                                        "model2_better"])
               + votes("i2", "visual_1", ["model2_better_unconfident", "model2_better_unconfident"]))
    res = score_judgments(df)
    assert res["criteria"]["visual_1"]["model1"] == pytest.approx(0.3)
    assert res["criteria"]["visual_1"]["model2"] == pytest.approx(0.4)
    assert res["invalid_rows"] == []


def test_items_weigh_equally_regardless_of_vote_count() -> None:
    # i1 has 4 votes all M1 (S1=1), i2 has 1 vote M2 (S1=0): mean over items = .5, not 4/5.
    df = table(votes("i1", "visual_2", ["model1_better"] * 4) + votes("i2", "visual_2", ["model2_better"]))
    assert score_judgments(df)["criteria"]["visual_2"] == {"model1": 0.5, "model2": 0.5}


def test_all_ties() -> None:
    df = table(votes("i1", "visual_3", ["equally"] * 5) + votes("i1", "pf_object_quantity", ["equally"] * 5))
    res = score_judgments(df)
    assert res["criteria"]["visual_3"] == {"model1": 0.5, "model2": 0.5}
    assert res["criteria"]["pf_object_quantity"] == {"model1": 0.5, "model2": 0.5}


def test_visual_10_11_and_prompt_following_formulas() -> None:
    # visual_10 i1: BC .5, M1 .25, Eq .25 -> S1 = .5 + .25 + .125 = .875 ; S2 = .5 + .125 = .625
    # pf_object_presence i1: BI .4, M2 .2, Eq .2, BC .2 -> S1 = .2 + .1 = .3 ; S2 = .2 + .2 + .1 = .5
    # (both_incorrect counts for neither model)
    df = table(votes("i1", "visual_10", ["both_correct", "both_correct", "model1_better", "equally"])
               + votes("i1", "pf_object_presence", ["both_incorrect", "both_incorrect", "model2_better", "equally",
                                                    "both_correct"]))
    res = score_judgments(df)
    assert res["criteria"]["visual_10"]["model1"] == pytest.approx(0.875)
    assert res["criteria"]["visual_10"]["model2"] == pytest.approx(0.625)
    assert res["criteria"]["pf_object_presence"]["model1"] == pytest.approx(0.3)
    assert res["criteria"]["pf_object_presence"]["model2"] == pytest.approx(0.5)


def test_group_scores_are_unweighted_means_of_present_criteria() -> None:
    # visual_1 (S1 1, S2 0) has 1 vote, visual_10 (all BC: 1, 1) has 10 votes: group = mean of the two criteria,
    # (1 + 1)/2 = 1 and (0 + 1)/2 = .5 -- not vote-weighted. Motion group: only visual_6 (M2 -> 0, 1).
    df = table(votes("i1", "visual_1", ["model1_better"]) + votes("i1", "visual_10", ["both_correct"] * 10)
               + votes("i2", "visual_6", ["model2_better"]))
    res = score_judgments(df)
    assert res["overall_visual_quality"] == {"model1": 1.0, "model2": 0.5}
    assert res["overall_motion"] == {"model1": 0.0, "model2": 1.0}
    assert res["overall_prompt_following"] is None  # no ratings in that group
    assert set(res["criteria"]) == {"visual_1", "visual_6", "visual_10"}


def test_groups_membership() -> None:
    # One M1 vote on every visual criterion except 8, which gets M2: visual group (1-5,9,10) = 1;
    # motion group (6,7,8,11) = (1+1+0+1)/4 = .75 for model 1.
    rows = [("i1", "r", f"visual_{i}", "model1_better") for i in range(1, 12) if i != 8]
    rows.append(("i1", "r", "visual_8", "model2_better"))
    res = score_judgments(table(rows))
    assert res["overall_visual_quality"]["model1"] == 1.0
    assert res["overall_motion"] == {"model1": 0.75, "model2": 0.25}


def test_side_swaps_map_back_to_a_b() -> None:
    assert unswap_choice("model1_better", a_on_left=True) == "model1_better"
    assert unswap_choice("model1_better", a_on_left=False) == "model2_better"
    assert unswap_choice("model2_better_unconfident", a_on_left=False) == "model1_better_unconfident"
    for tie in ("equally", "both_correct", "both_incorrect", "not_applicable"):
        assert unswap_choice(tie, a_on_left=False) == tie
    # Two annotators both prefer A. r1 saw A on the left and clicked "Model 1 better"; r2 saw A on the right and
    # clicked "Model 2 better" (the right side). After unswapping both are A wins -> S1 = 1, S2 = 0.
    screen = [("i1", "r1", "visual_9", "model1_better", True), ("i1", "r2", "visual_9", "model2_better", False)]
    df = table([(i, a, c, unswap_choice(ch, left)) for i, a, c, ch, left in screen])
    assert score_judgments(df)["criteria"]["visual_9"] == {"model1": 1.0, "model2": 0.0}


def test_invalid_rows_reported_with_line_numbers_and_excluded() -> None:
    df = table([
        ("i1", "r1", "visual_1", "model1_better"),              # line 2 ok
        ("i1", "r2", "visual_12", "model1_better"),             # line 3 unknown criterion
        ("i1", "r3", "visual_1", "both_correct"),               # line 4 not allowed for 1-9
        ("i1", "r4", "pf_object_quantity", "model1_better_unconfident"),  # line 5 not allowed for PF
        ("i1", "r5", "visual_3", "not_applicable"),             # line 6 n/a only for visual_8
        ("i1", "r6", "visual_8", "not_applicable"),             # line 7 ok, carries no vote
        ("", "r7", "visual_1", "model2_better"),                # line 8 empty item id
        ("i1", "r8", "visual_10", "model1_better_unconfident"),  # line 9 not allowed for 10-11
    ])
    res = score_judgments(df)
    assert res["invalid_rows"] == [3, 4, 5, 6, 8, 9]
    assert res["criteria"] == {"visual_1": {"model1": 1.0, "model2": 0.0}}  # visual_8 n/a -> no score
    valid, invalid = split_valid(df)
    assert len(valid) == 2 and invalid == res["invalid_rows"]


def test_pairwise_agreement_hand_worked() -> None:
    # unit (i1, visual_1): M1, M1, M2 -> 3 pairs, 1 agrees ; unit (i1, visual_2): Eq, Eq -> 1 pair, agrees
    # -> 2 / 4 = .5 ; a unit with one vote has no pairs.
    df = table(votes("i1", "visual_1", ["model1_better", "model1_better", "model2_better"])
               + votes("i1", "visual_2", ["equally", "equally"]) + votes("i2", "visual_2", ["model1_better"]))
    assert pairwise_agreement(df) == pytest.approx(0.5)
    assert pairwise_agreement(df, criteria=["visual_2"]) == 1.0
    assert pairwise_agreement(table(votes("i1", "visual_1", ["equally"]))) is None


def test_krippendorff_alpha_hand_worked_and_published_example() -> None:
    # Units (a,a), (a,b): o_aa = 2, o_ab = o_ba = 1, n_a = 3, n_b = 1, n = 4
    # alpha = 1 - (n-1) * (o_ab + o_ba) / (2 n_a n_b) = 1 - 3 * 2 / 6 = 0
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"]]) == pytest.approx(0.0)
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal([["a", "a"], ["a"]]) is None  # one category only
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", 4 observers x 12 units with missing
    # values: nominal alpha = 0.743.
    obs = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
           [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]
    units = [[v for v in col if v is not None] for col in zip(*obs)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
    # perfect agreement through the DataFrame entry point
    df = table(votes("i1", "visual_1", ["model1_better"] * 3) + votes("i2", "visual_1", ["equally"] * 3))
    assert krippendorff_alpha(df) == pytest.approx(1.0)


def test_golden_accuracy_per_annotator() -> None:
    golden = {"g_same": ("identical", None), "g_deg": ("degraded", "B")}
    df = table([
        ("g_same", "ann1", "visual_1", "equally"),          # right (tie)
        ("g_same", "ann1", "visual_10", "both_correct"),    # right (tie)
        ("g_same", "ann2", "visual_1", "model1_better"),    # wrong
        ("g_deg", "ann1", "visual_9", "model2_better_unconfident"),  # right: B is intact
        ("g_deg", "ann2", "visual_9", "model1_better"),     # wrong
        ("g_deg", "ann2", "visual_3", "model1_better"),     # not checked for degraded pairs
        ("x", "ann2", "visual_9", "model1_better"),         # not golden
    ])
    acc = golden_accuracy(df, golden)
    assert acc == {"ann1": {"checked": 3, "correct": 3, "accuracy": 1.0},
                   "ann2": {"checked": 2, "correct": 0, "accuracy": 0.0}}


def test_bootstrap_intervals() -> None:
    # Identical items -> every resample gives the same score -> a zero-width interval at the point estimate.
    same = table(sum((votes(f"i{k}", "visual_1", ["model1_better", "equally"]) for k in range(10)), []))
    iv = bootstrap_intervals(same, n_boot=200, seed=1)
    assert iv["visual_1"]["model1"].low == pytest.approx(0.75) and iv["visual_1"]["model1"].high == pytest.approx(0.75)
    # Mixed items: the interval brackets the point estimate, is reproducible for a seed, and has width.
    mixed = table(sum((votes(f"i{k}", "pf_object_presence", ["model1_better" if k % 3 else "model2_better"])
                       for k in range(30)), []))
    point = score_judgments(mixed)["criteria"]["pf_object_presence"]["model1"]
    a = bootstrap_intervals(mixed, n_boot=500, seed=7)
    b = bootstrap_intervals(mixed, n_boot=500, seed=7)
    lo, hi = a["pf_object_presence"]["model1"].low, a["pf_object_presence"]["model1"].high
    assert lo < point < hi and (lo, hi) == (b["pf_object_presence"]["model1"].low,
                                            b["pf_object_presence"]["model1"].high)
    assert "overall_prompt_following" in a and "overall_motion" not in a


def test_distribution_and_summary_exclude_golden_from_scores() -> None:
    df = table(votes("i1", "visual_1", ["model1_better", "model1_better", "equally", "model2_better"])
               + votes("g", "visual_1", ["model2_better"] * 4))
    dist = choice_distribution(df[df["item_id"] == "i1"])
    assert dist["visual_1"] == {"model1_better": 0.5, "model2_better": 0.25, "equally": 0.25,
                                "model1_better_unconfident": 0.0, "model2_better_unconfident": 0.0}
    summary = full_summary(df, golden={"g": ("identical", None)}, n_boot=50)
    # i1 only: S1 = .5 + .25/2 = .625
    assert summary["criteria"]["visual_1"]["model1"] == pytest.approx(0.625)
    assert summary["golden_accuracy"]["r0"]["accuracy"] == 0.0
    assert summary["n_items"] == 1 and summary["n_judgments"] == 4

"""Annotation plan: overlap with distinct annotators, balance, side randomisation, golden pairs, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from evaluation.sbs.sbs_plan import PlanItem, build_plan, coverage, degrade_frames, golden_specs, under_covered


def items(n: int, golden: int = 0) -> list[PlanItem]:
    out = [PlanItem(f"p{k}", f"prompt {k}", f"p{k}_a.mp4", f"p{k}_b.mp4") for k in range(n)]
    specs = golden_specs(golden // 2, golden - golden // 2, seed=3)
    out += [PlanItem(f"g{k}", "g", "a.mp4", "b.mp4", golden=kind, better=better)
            for k, (kind, better) in enumerate(specs)]
    return out


def test_overlap_distinct_and_balanced() -> None:
    annotators = [f"a{k}" for k in range(12)]
    plan = build_plan(items(60, golden=4), annotators, overlap=5, seed=1)
    cov = coverage(plan)
    assert all(cov[f"p{k}"] == 5 for k in range(60))
    assert all(cov[f"g{k}"] == 12 for k in range(4))  # golden pairs reach everyone
    assert under_covered(cov, 5) == {}
    pairs = [(a.annotator, a.item_id) for a in plan.assignments]
    assert len(pairs) == len(set(pairs))  # nobody sees a pair twice
    loads = Counter(a.annotator for a in plan.assignments if a.item_id.startswith("p"))
    assert max(loads.values()) - min(loads.values()) <= 1  # 60*5/12 = 25 each
    for a in annotators:  # positions are a permutation
        assert sorted(x.position for x in plan.for_annotator(a)) == list(range(len(plan.for_annotator(a))))


def test_sides_randomised_per_assignment_and_seeded() -> None:
    annotators = [f"a{k}" for k in range(10)]
    plan = build_plan(items(200), annotators, overlap=5, seed=7)
    left = sum(a.a_on_left for a in plan.assignments)
    assert 400 < left < 600  # 1000 assignments, fair coin
    # the same item is not always on the same side for all of its annotators
    by_item: dict[str, set[bool]] = {}
    for a in plan.assignments:
        by_item.setdefault(a.item_id, set()).add(a.a_on_left)
    assert sum(len(v) == 2 for v in by_item.values()) > 150
    again = build_plan(items(200), annotators, overlap=5, seed=7)
    assert again.assignments == plan.assignments
    assert build_plan(items(200), annotators, overlap=5, seed=8).assignments != plan.assignments


def test_json_roundtrip_and_errors() -> None:
    plan = build_plan(items(5, golden=2), ["x", "y", "z"], overlap=2, seed=0)
    back = type(plan).from_json(plan.to_json())
    assert back.items == plan.items and back.assignments == plan.assignments
    assert set(back.golden_map()) == {"g0", "g1"}
    with pytest.raises(ValueError):
        build_plan(items(3), ["x", "y"], overlap=5)
    with pytest.raises(ValueError):
        build_plan(items(3) + items(1), ["x", "y"], overlap=1)  # duplicate ids


def test_under_covered_and_degrade() -> None:
    assert under_covered({"p0": 5, "p1": 3, "g0": 1}, 5, golden=["g0"]) == {"p1": 3}
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 32, 48, 3), dtype=np.uint8)
    bad = degrade_frames(frames, seed=1)
    assert bad.shape == frames.shape and bad.dtype == np.uint8
    assert np.abs(bad.astype(int) - frames.astype(int)).mean() > 20
    assert degrade_frames(frames[0]).shape == (32, 48, 3)

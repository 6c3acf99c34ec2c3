"""MagCache: a skipped step adds the cached residual exactly once, CFG branch states stay apart, the skip rule decides
both ways (threshold, consecutive-skip limit, retention), calibration records per-branch ratios."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

from k5model import CrossDiT, get_preset
from k5model.distill.evaluate import random_text
from k5model.magcache import CachedVisualStack, MagCache, MagCacheConfig, resample_ratios
from k5model.sampling import sample
from k5model.synthetic import randomize

SHAPE = (1, 3, 4, 4, 16)
STEPS = 10

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dit() -> CrossDiT:
    return randomize(CrossDiT(get_preset("tiny")), std=0.1, seed=0).eval()


def traced_sample(model: CrossDiT, cache: MagCache, **kw) -> tuple[torch.Tensor, list[dict]]:
    """Sample with MagCache and record every visual-stack call: step, branch, input, output, skipped or not."""
    calls: list[dict] = []

    def hook(module, args, out):
        skipped = cache.skipped > (calls[-1]["skipped_total"] if calls else 0)
        calls.append({"step": cache.step, "branch": cache.branch, "x": args[0].clone(), "out": out.clone(),
                      "skipped": skipped, "skipped_total": cache.skipped})

    handle = register_module_forward_hook(
        lambda module, args, out: hook(module, args, out) if isinstance(module, CachedVisualStack) else None)
    try:
        x = sample(model, latent_shape=SHAPE, seed=3, num_steps=cache.num_steps, progress=False, magcache=cache, **kw)
    finally:
        handle.remove()
    return x, calls


def test_skipped_step_adds_cached_residual_exactly_once_and_branches_stay_apart(tiny_dit):
    flat = {"cond": [1.0] * STEPS, "uncond": [1.0] * STEPS}  # error stays 0: every allowed step skips
    cache = MagCache(STEPS, ratios=flat, config=MagCacheConfig(threshold=0.5, max_skip_steps=1, retention_ratio=0.0))
    _, calls = traced_sample(tiny_dit, cache, cond=random_text(1), uncond=random_text(2), guidance_scale=5.0)
    assert [c["branch"] for c in calls[:4]] == ["cond", "uncond", "cond", "uncond"]
    skipped = [c for c in calls if c["skipped"]]
    assert skipped and len(skipped) < len(calls)
    for c in skipped:
        # the last computed call of the SAME branch holds the residual that must be added, once
        last = [p for p in calls if p["branch"] == c["branch"] and not p["skipped"] and p["step"] < c["step"]][-1]
        residual = last["out"] - last["x"]
        assert torch.equal(c["out"], c["x"] + residual)
        other = [p for p in calls if p["branch"] != c["branch"] and not p["skipped"] and p["step"] < c["step"]][-1]
        assert not torch.allclose(c["out"], c["x"] + (other["out"] - other["x"]))
        assert not torch.allclose(c["out"], c["x"] + 2 * residual)
    # max_skip_steps=1: per branch the pattern is compute, skip, compute, skip ...
    cond_pattern = [c["skipped"] for c in calls if c["branch"] == "cond"]
    assert cond_pattern == [False, True] * (STEPS // 2)
    assert cache.stats()["skipped_stack_calls"] == STEPS


def test_skip_rule_decides_both_ways(tiny_dit):
    cond, uncond = random_text(1), random_text(2)
    reference = sample(tiny_dit, latent_shape=SHAPE, seed=3, num_steps=STEPS, cond=cond, uncond=uncond,
                       guidance_scale=5.0, batched_cfg=False, progress=False)
    ratios = {"cond": [1.3] * STEPS, "uncond": [1.3] * STEPS}  # |1 - 1.3| = 0.3 per step
    never = MagCache(STEPS, ratios=ratios, config=MagCacheConfig(threshold=0.2, retention_ratio=0.0))
    out = sample(tiny_dit, latent_shape=SHAPE, seed=3, num_steps=STEPS, cond=cond, uncond=uncond, guidance_scale=5.0,
                 progress=False, magcache=never)
    assert never.skipped == 0 and never.computed == 2 * STEPS and torch.equal(out, reference)
    loose = MagCache(STEPS, ratios=ratios, config=MagCacheConfig(threshold=10.0, max_skip_steps=2,
                                                                  retention_ratio=0.5))
    _, calls = traced_sample(tiny_dit, loose, cond=cond, uncond=uncond, guidance_scale=5.0)
    pattern = [c["skipped"] for c in calls if c["branch"] == "uncond"]
    # retention: the first half always computes; then compute once per 2 skips
    assert pattern == [False] * 5 + [True, True, False, True, True]


def test_calibration_records_per_branch_ratios_and_cached_run_stays_close(tiny_dit):
    cond, uncond = random_text(1), random_text(2)
    calib = MagCache(STEPS, calibrate=True)
    reference = sample(tiny_dit, latent_shape=SHAPE, seed=3, num_steps=STEPS, cond=cond, uncond=uncond,
                       guidance_scale=5.0, progress=False, magcache=calib)
    ratios = calib.calibrated_ratios()
    assert set(ratios) == {"cond", "uncond"} and all(len(r) == STEPS for r in ratios.values())
    assert ratios["cond"][0] == 1.0 and ratios["cond"] != ratios["uncond"] and calib.skipped == 0
    cache = MagCache(STEPS, ratios=ratios, config=MagCacheConfig(threshold=0.5))
    cached = sample(tiny_dit, latent_shape=SHAPE, seed=3, num_steps=STEPS, cond=cond, uncond=uncond,
                    guidance_scale=5.0, progress=False, magcache=cache)
    assert 0 < cache.skipped and cache.computed < 2 * STEPS
    deviation = (cached - reference).pow(2).mean() / reference.pow(2).mean()
    assert deviation < 0.2


def test_config_and_ratio_errors():
    with pytest.raises(ValueError, match="retention_ratio"):
        MagCacheConfig(retention_ratio=1.5)
    with pytest.raises(ValueError, match="calibrated mag ratios"):
        MagCache(10)
    assert resample_ratios([1.0, 2.0, 3.0], 5) == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert resample_ratios([1.0, 2.0], 2) == [1.0, 2.0]

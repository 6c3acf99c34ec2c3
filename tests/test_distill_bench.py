"""bench.distill's CPU smoke mode (issue 18): every model of the H200 table samples with its own settings, the calls
actually computed are counted (batched CFG: 2 branch rows a call; MagCache: skipped visual stacks), and diffusers' own
MagCache hook runs as the anchor on the same weights."""

from __future__ import annotations

import math

import pytest


@pytest.mark.usefixtures("one_thread")
def test_distill_bench_smoke_counts_calls_and_deviation(monkeypatch):
    from bench.distill import main

    monkeypatch.delenv("OUT", raising=False)
    res = main(["--smoke", "--prompts", "1"])
    assert res["cfg100"]["transformer_calls_per_sample"] == 4 and res["cfg100"]["branch_evaluations_per_sample"] == 8
    assert res["cfg_distilled50"]["branch_evaluations_per_sample"] == 4  # guidance 1: one branch a step
    assert res["flash16"]["branch_evaluations_per_sample"] == 2  # its 2 saved boundaries (16 at full scale)
    mag = res["magcache100"]
    assert mag["visual_stack_skipped_per_sample"] > 0
    assert mag["visual_stack_computed_per_sample"] + mag["visual_stack_skipped_per_sample"] == 8
    anchor = res["diffusers_magcache100"]
    assert 0 < anchor["visual_stack_computed_per_sample"] <= 8
    assert anchor["attention_backend"] == "native"  # on a GPU the anchor runs _native_cudnn, its best backend
    for name in ("cfg_distilled50", "flash16", "magcache100", "diffusers_magcache100"):
        assert math.isfinite(res[name]["latent_mse_to_cfg100"]) and res[name]["seconds_per_sample"] > 0

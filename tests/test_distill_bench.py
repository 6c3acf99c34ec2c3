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


@pytest.mark.usefixtures("one_thread")
def test_distill_bench_anchor_keeps_branch_states_apart(monkeypatch):
    """With one cache context per CFG branch, diffusers' hook skips like ours and lands as close to the reference
    (without them its one state mixes the branches: 2.0e-3 against 6e-6 in this setting, docs/distillation.md)."""
    from bench.distill import main

    monkeypatch.delenv("OUT", raising=False)
    res = main(["--smoke", "--prompts", "1", "--runs", "magcache100,diffusers_magcache100"])
    ours, anchor = res["magcache100"], res["diffusers_magcache100"]
    assert anchor["branch_cache_contexts"] is True
    assert anchor["visual_stack_computed_per_sample"] == ours["visual_stack_computed_per_sample"]
    assert anchor["latent_mse_to_cfg100"] == pytest.approx(ours["latent_mse_to_cfg100"], rel=0.05)
    assert "cfg_distilled50" not in res and "flash16" not in res  # --runs picks what is timed


@pytest.mark.usefixtures("one_thread")
def test_distill_bench_random_mode_reuses_a_saved_reference(monkeypatch, tmp_path):
    """The GPU timing mode split over two calls (a device call is capped at 10 minutes): the second call rebuilds the
    same seeded weights and measures against the first call's reference latents and calibration."""
    import json

    import torch

    from bench.distill import main

    monkeypatch.delenv("OUT", raising=False)
    small = ["--random", "--preset", "tiny", "--latent", "2x8x8", "--prompts", "1"]
    first = main([*small, "--runs", "cfg100,magcache100", "--save-reference", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {"cfg100_latents.pt", "cfg100.json", "calibration.json"}
    assert torch.load(tmp_path / "cfg100_latents.pt").shape == (1, 2, 8, 8, 16)
    assert json.loads((tmp_path / "calibration.json").read_text())["num_steps"] == 50
    second = main([*small, "--runs", "magcache100", "--reference", str(tmp_path)])
    assert second["cfg100"] == first["cfg100"]  # carried over, not re-measured
    for key in ("visual_stack_computed_per_sample", "latent_mse_to_cfg100"):
        assert second["magcache100"][key] == pytest.approx(first["magcache100"][key], rel=1e-6, abs=1e-12)
    with pytest.raises(SystemExit):
        main([*small, "--runs", "magcache"])  # unknown run name: a usage error
    with pytest.raises(SystemExit, match="no cfg100_latents.pt; write one with --save-reference"):
        main([*small, "--runs", "magcache100", "--reference", str(tmp_path / "missing")])


@pytest.mark.usefixtures("one_thread")
def test_warm_up_leaves_no_compile_inside_the_timed_runs():
    """The H200 MagCache timing once held a recompile: the warm-up had not run the branches apart, and the null
    text's shorter length is a new shape for the compiled blocks. After ``warm_up`` every timed run's shapes are
    compiled already; a warm-up without the one-branch-at-a-time step leaves MagCache a new graph to compile."""
    import torch
    from torch._dynamo.utils import counters

    from bench.distill import warm_up
    from k5model import CrossDiT, get_preset
    from k5model.distill.evaluate import random_text
    from k5model.magcache import MagCache
    from k5model.sampling import sample
    from k5model.synthetic import randomize

    cfg = get_preset("tiny")
    cond, null, shape = random_text(0, length=32), random_text(1, length=8), (2, 8, 8, 16)

    def new_graphs(model: CrossDiT) -> int:
        before = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            for guidance, cache in ((5.0, MagCache(3, calibrate=True)), (1.0, None), (5.0, None)):
                sample(model, latent_shape=(1, *shape), cond=cond, uncond=null, seed=1, guidance_scale=guidance,
                       num_steps=3, shift=10.0, progress=False, magcache=cache)
        return counters["stats"]["unique_graphs"] - before

    torch._dynamo.reset()
    warmed = randomize(CrossDiT(cfg), seed=0).eval().compile_blocks()
    warm_up(warmed, cond, null, shape)
    assert new_graphs(warmed) == 0
    torch._dynamo.reset()
    partly = randomize(CrossDiT(cfg), seed=0).eval().compile_blocks()
    with torch.no_grad():  # the old warm-up: CFG batched and guidance 1 only
        for guidance in (5.0, 1.0):
            sample(partly, latent_shape=(1, *shape), cond=cond, uncond=null, seed=0, guidance_scale=guidance,
                   num_steps=1, shift=10.0, progress=False)
    assert new_graphs(partly) > 0
    torch._dynamo.reset()

"""The issue-18 acceptance comparison at demo scale (tiny preset, CPU), one code path for the test and the docs:

- reference: the teacher at 100 NFE with CFG 5.0 (null prompt);
- the 50-NFE CFG-distilled student must be closer to it (latent MSE over fixed seeds and prompts) than the undistilled
  teacher at 50 NFE without CFG;
- the 16-NFE TSCD model (on its saved boundaries) must be closer than the CFG-distilled model at 16 NFE;
- 100-NFE CFG with MagCache (calibrated on other seeds): visual-stack calls computed and its deviation.

``python -m k5model.distill.evaluate`` prints the figures recorded in docs/distillation.md.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from k5model.config import get_preset
from k5model.crossdit import CrossDiT
from k5model.distill.cfg_distill import CFGDistillConfig, train_cfg_distill
from k5model.distill.common import DistillSet, frozen_copy, latent_mse, sample_set, stack_text
from k5model.distill.tscd import TSCDConfig, train_tscd
from k5model.flow_matching import TextCondition
from k5model.magcache import MagCache
from k5model.sampling import sample
from k5model.synthetic import randomize


@dataclass(frozen=True, kw_only=True)
class TinyAcceptance:
    """Scale of the demo comparison."""

    prompts: int = 4
    """Random text conditions standing in for encoded prompts."""
    train_seeds: int = 8
    """Noise seeds per prompt for the distillation set (teacher's guided samples)."""
    eval_seeds: tuple[int, ...] = (0, 1)
    """Held-out noise seeds of the comparison."""
    latent_shape: tuple[int, int, int, int] = (3, 4, 4, 16)
    """(T, H, W, C) latents."""
    shift: float = 5.0
    """Sampling shift of every run."""
    reference_steps: int = 100
    """NFE per branch of the guided reference."""
    data_steps: int = 20
    """NFE of the teacher samples used as the distillation set."""
    train_steps: int = 150
    """Optimiser steps of each distillation stage."""
    lr: float = 1e-3
    """Learning rate of each stage (tiny model)."""
    batch_size: int = 8
    """Samples per optimiser step."""
    tscd_steps: int = 16
    """NFE of the TSCD model."""
    magcache: bool = True
    """Also measure 100-NFE CFG with MagCache."""


def random_text(seed: int, length: int = 5, width: int = 32, pooled_width: int | None = None,
                device: torch.device | str = "cpu") -> TextCondition:
    """A random text condition: (1, length, width) states and (1, pooled_width or width) pooled, drawn on the CPU
    from ``seed`` and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(1, length, width, generator=g)
    pooled = torch.randn(1, pooled_width or width, generator=g)
    return TextCondition(states.to(device), torch.ones(1, length, dtype=torch.bool, device=device), pooled.to(device))


def tiny_acceptance(scale: TinyAcceptance | None = None) -> dict[str, Any]:
    """Run the whole comparison on a random-weight tiny teacher; returns the figures."""
    s = scale or TinyAcceptance()
    t0 = time.perf_counter()
    teacher = frozen_copy(randomize(CrossDiT(get_preset("tiny")), std=0.1, seed=0))
    prompts, null = [random_text(i) for i in range(s.prompts)], random_text(999, length=2)
    kw = dict(shape=s.latent_shape, shift=s.shift)
    train_seeds = range(100, 100 + s.train_seeds)
    data = DistillSet(sample_set(teacher, prompts, train_seeds, num_steps=s.data_steps, guidance_scale=5.0,
                                 null=null, **kw),
                      stack_text([p for p in prompts for _ in train_seeds]))
    reference = sample_set(teacher, prompts, s.eval_seeds, num_steps=s.reference_steps, guidance_scale=5.0, null=null,
                           **kw)
    out: dict[str, Any] = {"scale": {k: v for k, v in s.__dict__.items()}}
    out["undistilled_50_nocfg"] = latent_mse(sample_set(teacher, prompts, s.eval_seeds, num_steps=50, **kw), reference)
    out["teacher_50_cfg"] = latent_mse(
        sample_set(teacher, prompts, s.eval_seeds, num_steps=50, guidance_scale=5.0, null=null, **kw), reference)

    student = copy.deepcopy(teacher).requires_grad_(True)
    train_cfg_distill(student, teacher, data, null, CFGDistillConfig(steps=s.train_steps, lr=s.lr, shift=s.shift,
                                                                     batch_size=s.batch_size))
    cfg_distilled = frozen_copy(student)
    out["cfg_distilled_50"] = latent_mse(sample_set(cfg_distilled, prompts, s.eval_seeds, num_steps=50, **kw),
                                         reference)
    out["cfg_distilled_16"] = latent_mse(
        sample_set(cfg_distilled, prompts, s.eval_seeds, num_steps=s.tscd_steps, **kw), reference)

    fast = copy.deepcopy(cfg_distilled).requires_grad_(True)
    boundaries, _ = train_tscd(fast, cfg_distilled, data, TSCDConfig(
        num_steps=s.tscd_steps, shift=s.shift, steps=s.train_steps, lr=s.lr, batch_size=s.batch_size))
    out["tscd_16"] = latent_mse(sample_set(fast.eval(), prompts, s.eval_seeds, num_steps=s.tscd_steps,
                                           timesteps=boundaries, **kw), reference)
    out["tscd_boundaries"] = [round(b, 5) for b in boundaries]

    if s.magcache:
        calib = MagCache(s.reference_steps, calibrate=True)
        sample(teacher, latent_shape=(1, *s.latent_shape), cond=prompts[0], uncond=null, seed=12345,
               num_steps=s.reference_steps, shift=s.shift, progress=False, magcache=calib)
        cached, computed = [], 0
        for cond in prompts:
            for seed in s.eval_seeds:
                cache = MagCache(s.reference_steps, ratios=calib.calibrated_ratios())
                cached.append(sample(teacher, latent_shape=(1, *s.latent_shape), cond=cond, uncond=null, seed=seed,
                                     num_steps=s.reference_steps, shift=s.shift, progress=False, magcache=cache))
                computed += cache.computed
        out["magcache_100_cfg"] = latent_mse(torch.cat(cached), reference)
        out["magcache_stack_calls_per_sample"] = computed / len(cached)
        out["stack_calls_per_sample_uncached"] = 2 * s.reference_steps
    out["reference_mean_square"] = float(reference.pow(2).mean())
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(tiny_acceptance(), indent=2))

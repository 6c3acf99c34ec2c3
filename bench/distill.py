"""Distilled models and MagCache (issue 18): wall time, transformer calls actually computed and latent deviation from
the 100-NFE guided reference, for

- ``cfg100``: the teacher, 50 steps with CFG 5 (100 NFE: the reference itself, timed),
- ``cfg_distilled50``: the CFG-distilled model, 50 steps, guidance 1,
- ``flash16``: the Flash model on its 16 saved segment boundaries, guidance 1,
- ``magcache100``: the teacher, 50 steps with CFG and MagCache (its calibration's ratios and knobs),
- ``diffusers_magcache100``: the anchor, diffusers' Kandinsky5Transformer3DModel with the same weights driven like
  its T2V pipeline (two forwards a step) under diffusers' own ``apply_mag_cache`` hook with the same ratios.

Each model samples with its folder's own ``sampling_config.json`` (``SamplingSettings``), the same prompts and seeds.

    python -m bench.distill --teacher T --cfg-distilled C --flash F --magcache M   # GPU: video_lite 5 s 512x768
    python -m bench.distill --smoke                                                  # CPU: tiny random teacher

``--smoke`` runs every code path on the tiny preset with a random teacher standing in for every student (the settings
are the real ones scaled down: reference 8 steps, 4-step "CFG-distilled", 2-step "Flash" boundaries, MagCache
calibrated on the spot), so the figures there are mechanics, not quality. The H200 figures are owed (docs/
distillation.md).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from bench.common import device_info, diffusers_twin, sync, write_result
from k5model import CrossDiT, get_preset
from k5model.distill.common import latent_mse
from k5model.distill.settings import SamplingSettings, read_sampling_settings
from k5model.distill.tscd import segment_boundaries
from k5model.magcache import MagCache, calibration_record
from k5model.sampling import sample
from k5model.synthetic import randomize


class CallCounter:
    """Forward calls of a module and the batch rows they computed (batched CFG: 2 rows a call)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = self.rows = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.calls += 1
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        self.rows += int(out.shape[0]) if torch.is_tensor(out) else 1


def run_settings(model: CrossDiT, settings: SamplingSettings, conds: list, null: Any, shape: tuple, seeds: list[int],
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sample every (condition, seed) with ``settings``; the latents and {seconds, calls, rows, stack calls}."""
    counter = CallCounter(model)
    outs, computed, skipped = [], 0, 0
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for cond in conds:
            for seed in seeds:
                cache = settings.build_magcache()
                outs.append(sample(model, latent_shape=(1, *shape), cond=cond, uncond=null, seed=seed,
                                   guidance_scale=settings.guidance_scale, num_steps=settings.num_steps,
                                   shift=settings.shift, timesteps=settings.timesteps, progress=False,
                                   magcache=cache))
                if cache is not None:
                    computed, skipped = computed + cache.computed, skipped + cache.skipped
    sync()
    n = len(outs)
    stats = {"seconds_per_sample": (time.perf_counter() - t0) / n, "transformer_calls_per_sample": counter.calls / n,
             "branch_evaluations_per_sample": counter.rows / n, "num_steps": settings.num_steps,
             "guidance_scale": settings.guidance_scale}
    if settings.magcache is not None:
        stats.update(visual_stack_computed_per_sample=computed / n, visual_stack_skipped_per_sample=skipped / n)
    counter.handle.remove()
    return torch.cat(outs), stats


def calibrate(model: CrossDiT, cond: Any, null: Any, shape: tuple, steps: int, shift: float) -> dict[str, Any]:
    """A MagCache calibration of ``model`` at this sampling setting (seed 4242, outside the measured seeds)."""
    cache = MagCache(steps, calibrate=True)
    with torch.no_grad():
        sample(model, latent_shape=(1, *shape), cond=cond, uncond=null, seed=4242, guidance_scale=5.0,
               num_steps=steps, shift=shift, progress=False, magcache=cache)
    return calibration_record(cache, shift=shift, latent_shape=(1, *shape), guidance_scale=5.0)


def diffusers_magcache(model: CrossDiT, cfg: Any, settings: SamplingSettings, conds: list, null: Any, shape: tuple,
                       seeds: list[int], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """The anchor: diffusers' transformer under its own MagCache hook, two forwards a step like its pipeline."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    from bench.generation_speed import diffusers_loop

    ref = diffusers_twin(cfg, model, device, dtype)
    backend = "_native_cudnn" if device.type == "cuda" else "native"  # the anchor at its best attention on GPU
    ref.set_attention_backend(backend)
    knobs = settings.magcache.get("config", {}) if settings.magcache else {}
    ratios = settings.magcache["mag_ratios"]["cond"] if settings.magcache else None
    apply_mag_cache(ref, MagCacheConfig(mag_ratios=ratios, num_inference_steps=settings.num_steps,
                                        **{k: knobs[k] for k in ("threshold", "max_skip_steps", "retention_ratio")
                                           if k in knobs}))
    # a child of the first visual block runs only when the block computes (a skipped block returns from the hook)
    blocks = CallCounter(next(iter(ref.visual_transformer_blocks[0].children())))
    outs = []
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for cond in conds:
            for seed in seeds:
                noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
                outs.append(diffusers_loop(ref, noise, _tuple(cond), _tuple(null), settings.num_steps,
                                           settings.shift, settings.guidance_scale, (1.0, 2.0, 2.0)))
    sync()
    n = len(outs)
    return torch.cat(outs).float(), {"seconds_per_sample": (time.perf_counter() - t0) / n,
                                     "transformer_calls_per_sample": 2 * settings.num_steps,
                                     "visual_stack_computed_per_sample": blocks.calls / n,
                                     "num_steps": settings.num_steps, "guidance_scale": settings.guidance_scale,
                                     "attention_backend": backend}


def _tuple(cond: Any) -> tuple:
    """A TextCondition as diffusers' (embeds, mask, pooled), unpadded (diffusers passes no text mask)."""
    n = int(cond.mask.sum())
    return cond.embeds[:, :n], cond.mask[:, :n], cond.pooled


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random teacher standing in for every model")
    for name in ("teacher", "cfg-distilled", "flash", "magcache"):
        ap.add_argument(f"--{name}", help="pipeline folder (exported by the distillation assets)")
    ap.add_argument("--prompts", type=int, default=2, help="first N MovieGen prompts")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--no-diffusers", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    seeds = list(range(args.seeds))
    if args.smoke:
        from k5model.distill.evaluate import random_text

        cfg = get_preset("tiny")
        teacher = randomize(CrossDiT(cfg), std=0.1, seed=0).eval()
        models: dict[str, CrossDiT] = {k: teacher for k in ("cfg_distilled", "flash")}
        conds, null = [random_text(i) for i in range(args.prompts)], random_text(99, length=2)
        shape, ref_steps = (2, 8, 8, 16), 4
        settings = {"cfg_distilled": SamplingSettings(kind="cfg_distilled", num_steps=4, guidance_scale=1.0),
                    "flash": SamplingSettings(kind="flash", num_steps=2, guidance_scale=1.0,
                                              timesteps=tuple(segment_boundaries(2, 10.0)))}
        settings["magcache"] = SamplingSettings(num_steps=ref_steps, guidance_scale=5.0, magcache={
            **calibrate(teacher, conds[0], null, shape, ref_steps, 10.0), "config": {"retention_ratio": 0.0}})
    else:
        from evaluation.prompts import load_moviegen
        from k5model.pipeline import K5Pipeline

        missing = [n for n in ("teacher", "cfg_distilled", "flash", "magcache") if not getattr(args, n)]
        if missing:
            ap.error(f"pass {', '.join('--' + m.replace('_', '-') for m in missing)} (or --smoke)")
        pipe = K5Pipeline.from_pretrained(args.teacher, device=device)
        teacher, cfg = pipe.transformer, pipe.transformer.config
        conds = [pipe.encode_text(r.prompt) for r in load_moviegen(args.prompts)]
        null = pipe.encode_text("")
        shape, ref_steps = (args.seconds * 24 // 4 + 1, 64, 96, int(cfg.in_visual_dim)), 50
        models, settings = {}, {}
        for key, folder in (("cfg_distilled", args.cfg_distilled), ("flash", args.flash),
                            ("magcache", args.magcache)):
            own = read_sampling_settings(folder)
            if own is None:
                raise SystemExit(f"{folder}: no sampling_config.json; pass the distillation assets' exports")
            settings[key] = own
            if key != "magcache":
                models[key] = CrossDiT.from_pretrained(folder).to(device, dtype).eval()
        if dtype != torch.float32:
            teacher.to_mixed_precision(dtype)
    teacher = teacher.to(device).eval()
    reference = SamplingSettings(num_steps=ref_steps, guidance_scale=5.0)
    res: dict[str, Any] = {**device_info(cuda), "latent": list(shape), "prompts": len(conds), "seeds": len(seeds)}
    ref_latents, res["cfg100"] = run_settings(teacher, reference, conds, null, shape, seeds)
    runs: dict[str, tuple[CrossDiT, SamplingSettings]] = {
        "cfg_distilled50": (models["cfg_distilled"], settings["cfg_distilled"]),
        "flash16": (models["flash"], settings["flash"]),
        "magcache100": (teacher, replace(settings["magcache"], num_steps=ref_steps))}
    for name, (model, own) in runs.items():
        latents, res[name] = run_settings(model, own, conds, null, shape, seeds)
        res[name]["latent_mse_to_cfg100"] = latent_mse(latents, ref_latents)
    if not args.no_diffusers:
        run: Callable[..., tuple[torch.Tensor, dict]] = diffusers_magcache
        latents, res["diffusers_magcache100"] = run(teacher, cfg, replace(settings["magcache"], num_steps=ref_steps),
                                                    conds, null, shape, seeds, device, dtype)
        res["diffusers_magcache100"]["latent_mse_to_cfg100"] = latent_mse(latents, ref_latents)
    write_result("distill_smoke.json" if args.smoke else f"distill_{args.seconds}s.json", res)
    return res


if __name__ == "__main__":
    main()

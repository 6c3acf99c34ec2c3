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
    python -m bench.distill --random --save-reference R   # GPU, random full-size weights: calibrate, cfg100, 50, 16
    python -m bench.distill --random --reference R        # GPU, same weights: MagCache, diffusers' MagCache
    python -m bench.distill --smoke                                                  # CPU: tiny random teacher

``--smoke`` runs every code path on the tiny preset with a random teacher standing in for every student (the settings
are the real ones scaled down: reference 8 steps, 4-step "CFG-distilled", 2-step "Flash" boundaries, MagCache
calibrated on the spot), so the figures there are mechanics, not quality.

``--random`` is the GPU timing mode without exported folders: video_lite at full size with random weights (seed 0),
the students sharing the teacher's weights under their own real settings (50 steps guidance 1; 16 TSCD boundaries),
MagCache calibrated on the spot at seed 4242. Wall time and transformer calls are real; the latent deviations only
show the mechanics (random weights). A 100-NFE run takes minutes at full size, so the runs can be split over two
calls: ``--save-reference DIR`` keeps the reference latents and the calibration, ``--reference DIR`` reuses them
(the same seeded weights are rebuilt), and ``--runs`` names the runs to time.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
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


def warm_up(model: CrossDiT, cond: Any, null: Any, shape: tuple) -> None:
    """One step in every shape the timed runs give the compiled blocks, so no compile lands inside a timing: CFG
    batched (2 rows, text padded to one length), one branch a call with the prompt's text (guidance 1), and each
    branch on its own with its own text length (MagCache runs the branches apart; the null text is shorter)."""
    with torch.no_grad():
        for guidance, cache in ((5.0, None), (1.0, None), (5.0, MagCache(1, calibrate=True))):
            sample(model, latent_shape=(1, *shape), cond=cond, uncond=null, seed=0, guidance_scale=guidance,
                   num_steps=1, shift=10.0, progress=False, magcache=cache)


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
    # No regional compile here: MagCache's block hooks are torch.compiler.disable'd, so hooked blocks run eagerly
    # whatever compile_repeated_blocks says. One untimed step before the hook goes on (cuDNN plans, allocator).
    warm = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        diffusers_loop(ref, warm, _tuple(conds[0], dtype), _tuple(null, dtype), 1, settings.shift,
                       settings.guidance_scale, (1.0, 2.0, 2.0))
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
                outs.append(diffusers_loop(ref, noise, _tuple(cond, dtype), _tuple(null, dtype), settings.num_steps,
                                           settings.shift, settings.guidance_scale, (1.0, 2.0, 2.0), contexts=True))
    sync()
    n = len(outs)
    return torch.cat(outs).float(), {"seconds_per_sample": (time.perf_counter() - t0) / n,
                                     "transformer_calls_per_sample": 2 * settings.num_steps,
                                     "visual_stack_computed_per_sample": blocks.calls / n,
                                     "num_steps": settings.num_steps, "guidance_scale": settings.guidance_scale,
                                     "attention_backend": backend, "branch_cache_contexts": True}


def _tuple(cond: Any, dtype: torch.dtype) -> tuple:
    """A TextCondition as diffusers' (embeds, mask, pooled) in ``dtype``, unpadded (diffusers passes no mask)."""
    n = int(cond.mask.sum())
    return cond.embeds[:, :n].to(dtype), cond.mask[:, :n], cond.pooled.to(dtype)


def _save_reference(out: Path, latents: torch.Tensor, stats: dict[str, Any],
                    magcache: SamplingSettings | None) -> None:
    """Keep the reference latents, their timing and the calibration for a later call (``--reference``)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(latents.cpu(), out / "cfg100_latents.pt")
    (out / "cfg100.json").write_text(json.dumps(stats))
    if magcache is not None:
        (out / "calibration.json").write_text(json.dumps(magcache.magcache))


def _load_reference(folder: Path, settings: dict[str, SamplingSettings], steps: int,
                    own_calibration: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """The latents and timing ``_save_reference`` kept; with ``own_calibration`` (random weights, no folder to read
    it from) its calibration becomes the MagCache setting."""
    if not (folder / "cfg100_latents.pt").is_file():
        raise SystemExit(f"--reference {folder}: no cfg100_latents.pt; write one with --save-reference first")
    if own_calibration:
        settings["magcache"] = SamplingSettings(num_steps=steps, guidance_scale=5.0, magcache=json.loads(
            (folder / "calibration.json").read_text()))
    return torch.load(folder / "cfg100_latents.pt"), json.loads((folder / "cfg100.json").read_text())


RUNS = ("cfg100", "cfg_distilled50", "flash16", "magcache100", "diffusers_magcache100")


def _smoke_setup(args: argparse.Namespace) -> tuple:
    from k5model.distill.evaluate import random_text

    teacher = randomize(CrossDiT(get_preset("tiny")), std=0.1, seed=0).eval()
    conds, null = [random_text(i) for i in range(args.prompts)], random_text(99, length=2)
    shape, steps = (2, 8, 8, 16), 4
    settings = {"cfg_distilled": SamplingSettings(kind="cfg_distilled", num_steps=4, guidance_scale=1.0),
                "flash": SamplingSettings(kind="flash", num_steps=2, guidance_scale=1.0,
                                          timesteps=tuple(segment_boundaries(2, 10.0)))}
    settings["magcache"] = SamplingSettings(num_steps=steps, guidance_scale=5.0, magcache={
        **calibrate(teacher, conds[0], null, shape, steps, 10.0), "config": {"retention_ratio": 0.0}})
    return teacher, {k: teacher for k in ("cfg_distilled", "flash")}, settings, conds, null, shape, steps


def _folder_setup(args: argparse.Namespace, ap: argparse.ArgumentParser, device: torch.device,
                  dtype: torch.dtype) -> tuple:
    from evaluation.prompts import load_moviegen
    from k5model.pipeline import K5Pipeline

    missing = [n for n in ("teacher", "cfg_distilled", "flash", "magcache") if not getattr(args, n)]
    if missing:
        ap.error(f"pass {', '.join('--' + m.replace('_', '-') for m in missing)} (or --random, or --smoke)")
    pipe = K5Pipeline.from_pretrained(args.teacher, device=device)
    teacher, cfg = pipe.transformer, pipe.transformer.config
    conds = [pipe.encode_text(r.prompt) for r in load_moviegen(args.prompts)]
    null = pipe.encode_text("")
    shape = (args.seconds * 24 // 4 + 1, 64, 96, int(cfg.in_visual_dim))
    models, settings = {}, {}
    for key, folder in (("cfg_distilled", args.cfg_distilled), ("flash", args.flash), ("magcache", args.magcache)):
        own = read_sampling_settings(folder)
        if own is None:
            raise SystemExit(f"{folder}: no sampling_config.json; pass the distillation assets' exports")
        settings[key] = own
        if key != "magcache":
            models[key] = CrossDiT.from_pretrained(folder).to(device, dtype).eval()
    return teacher, models, settings, conds, null, shape, 50


def _random_setup(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple:
    """Full-size video_lite, random weights (seed 0); the students share them under their own settings."""
    from k5model.distill.evaluate import random_text

    cfg = get_preset(args.preset)
    teacher = randomize(CrossDiT(cfg), seed=0).to(device).eval()
    widths = dict(width=cfg.in_text_dim, pooled_width=cfg.in_text_dim2, device=device)
    conds = [random_text(i, length=256, **widths) for i in range(args.prompts)]
    null = random_text(999, length=8, **widths)
    t, h, w = (int(v) for v in args.latent.split("x")) if args.latent else (args.seconds * 24 // 4 + 1, 64, 96)
    shape = (t, h, w, int(cfg.in_visual_dim))
    settings = {"cfg_distilled": SamplingSettings(kind="cfg_distilled", num_steps=50, guidance_scale=1.0),
                "flash": SamplingSettings(kind="flash", num_steps=16, guidance_scale=1.0,
                                          timesteps=tuple(segment_boundaries(16, 10.0)))}
    return teacher, {"cfg_distilled": teacher, "flash": teacher}, settings, conds, null, shape, 50


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random teacher standing in for every model")
    for name in ("teacher", "cfg-distilled", "flash", "magcache"):
        ap.add_argument(f"--{name}", help="pipeline folder (exported by the distillation assets)")
    ap.add_argument("--prompts", type=int, default=2, help="first N MovieGen prompts")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--random", action="store_true", help="GPU: full-size video_lite with random weights, no folders")
    ap.add_argument("--preset", default="video_lite", help="--random: the model preset")
    ap.add_argument("--latent", default=None, help="--random: TxHxW latent shape (default: --seconds at 512x768)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--save-reference", help="folder to keep the cfg100 latents and the MagCache calibration in")
    ap.add_argument("--reference", help="folder written by --save-reference: reuse its latents and calibration")
    args = ap.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    if unknown := sorted(set(runs) - set(RUNS)):
        ap.error(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    seeds = list(range(args.seeds))
    if args.smoke:
        teacher, models, settings, conds, null, shape, ref_steps = _smoke_setup(args)
    elif args.random:
        teacher, models, settings, conds, null, shape, ref_steps = _random_setup(args, device, dtype)
    else:
        teacher, models, settings, conds, null, shape, ref_steps = _folder_setup(args, ap, device, dtype)
    cfg = teacher.config
    if dtype != torch.float32:
        teacher.to_mixed_precision(dtype)
    teacher = teacher.to(device).eval()
    ours_timed = not args.reference or bool({"cfg_distilled50", "flash16", "magcache100"} & set(runs))
    if cuda and ours_timed:  # every model at its best: compiled blocks, compiled before anything is timed
        for model in {id(m): m for m in (teacher, *models.values())}.values():
            warm_up(model.compile_blocks(), conds[0], null, shape)
    res: dict[str, Any] = {**device_info(cuda), "latent": list(shape), "prompts": len(conds), "seeds": len(seeds),
                           "weights": "random" if (args.random or args.smoke) else "folders"}
    if args.reference:
        ref_latents, res["cfg100"] = _load_reference(Path(args.reference), settings, ref_steps, args.random)
    else:
        if args.random and ({"magcache100", "diffusers_magcache100"} & set(runs) or args.save_reference):
            t0 = time.perf_counter()
            settings["magcache"] = SamplingSettings(num_steps=ref_steps, guidance_scale=5.0, magcache=calibrate(
                teacher, conds[0], null, shape, ref_steps, 10.0))
            res["calibration_seconds"] = time.perf_counter() - t0
        reference = SamplingSettings(num_steps=ref_steps, guidance_scale=5.0)
        ref_latents, res["cfg100"] = run_settings(teacher, reference, conds, null, shape, seeds)
        if args.save_reference:
            _save_reference(Path(args.save_reference), ref_latents, res["cfg100"], settings.get("magcache"))
    ref_latents = ref_latents.to(device)
    table: dict[str, tuple[CrossDiT, SamplingSettings]] = {
        "cfg_distilled50": (models["cfg_distilled"], settings["cfg_distilled"]),
        "flash16": (models["flash"], settings["flash"])}
    if "magcache" in settings:
        table["magcache100"] = (teacher, replace(settings["magcache"], num_steps=ref_steps))
    for name in runs:
        if name in table:
            model, own = table[name]
            latents, res[name] = run_settings(model, own, conds, null, shape, seeds)
            res[name]["latent_mse_to_cfg100"] = latent_mse(latents, ref_latents)
            print(name, json.dumps(res[name]), flush=True)
    if "diffusers_magcache100" in runs and not args.no_diffusers:
        latents, res["diffusers_magcache100"] = diffusers_magcache(
            teacher, cfg, replace(settings["magcache"], num_steps=ref_steps), conds, null, shape, seeds, device, dtype)
        res["diffusers_magcache100"]["latent_mse_to_cfg100"] = latent_mse(latents, ref_latents)
    write_result("distill_smoke.json" if args.smoke else f"distill_{args.seconds}s.json", res)
    return res


if __name__ == "__main__":
    main()

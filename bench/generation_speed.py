"""Whole denoising run of video_lite (text encoding and VAE decode excluded): ours vs diffusers' loop, same weights.

Ours: `k5model.sampling.sample` (official grid, CFG batched into one forward of batch 2, compiled blocks).
Anchor: diffusers' `Kandinsky5Transformer3DModel` driven the way `Kandinsky5T2VPipeline` drives it — two sequential
forwards per step (conditional, then unconditional) — compiled with `compile_repeated_blocks`, on the cuDNN attention
backend by default (its best on Hopper; ``--diffusers-backend native`` gives its default). Both get the same
random weights, noise and text states. Reports seconds per generation for `--steps` steps (100 NFE at 50 steps).

    python -m bench.generation_speed --steps 50            # GPU, 5 s 512x768
    python -m bench.generation_speed --steps 50 --seconds 10 --nabla
    python -m bench.generation_speed --smoke               # CPU, tiny preset
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from bench.common import device_info, diffusers_twin, sync, video_setup, write_result
from k5model import CrossDiT
from k5model.config import NABLA_10S
from k5model.flow_matching import rope_positions
from k5model.runtime_options import NablaOptions
from k5model.sampling import sample, sampling_grid
from k5model.synthetic import randomize


def diffusers_loop(model, noise, cond, uncond, steps, shift, guidance, scale_factor, sparse=None, contexts=False):
    """The denoising loop of diffusers' T2V pipeline on the official grid: two forwards per step. ``contexts`` runs
    each branch inside ``model.cache_context("cond"/"uncond")`` so a caching hook keeps one state per branch (diffusers'
    Kandinsky 5 pipeline sets none; its other pipelines do)."""
    x = noise.clone()
    grid = sampling_grid(steps, shift).to(x.device)
    b, t, h, w, _ = x.shape
    pos = rope_positions(x.shape, device=x.device)
    zeros = torch.zeros(b, t, h, w, 17, device=x.device, dtype=x.dtype)
    for i in range(steps):
        inp = torch.cat([x, zeros], -1).to(cond[0].dtype)
        ts = (grid[i] * 1000).expand(b)
        with model.cache_context("cond") if contexts else contextlib.nullcontext():
            vc = model(inp, cond[0], ts, cond[2], pos, torch.arange(cond[0].shape[1], device=x.device), scale_factor,
                       sparse_params=sparse).sample.float()
        with model.cache_context("uncond") if contexts else contextlib.nullcontext():
            vu = model(inp, uncond[0], ts, uncond[2], pos, torch.arange(uncond[0].shape[1], device=x.device),
                       scale_factor, sparse_params=sparse).sample.float()
        x = x + (grid[i + 1] - grid[i]) * (vu + guidance * (vc - vu))
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--nabla", action="store_true")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--diffusers-backend", default="_native_cudnn",
                    help="the anchor's attention backend: its best on Hopper (default), or 'native' (its default)")
    ap.add_argument("--residual-fp32", action="store_true", help="keep our residual streams in fp32")
    ap.add_argument("--force-total-density", type=float, default=None,
                    help="NABLA: pin the block density (STA included), for random weights")
    args = ap.parse_args()
    cuda, device, dtype, cfg, (frames, h, w, text_len) = video_setup(args.smoke, args.seconds)
    steps = args.steps if cuda else 3
    if args.nabla:
        cfg = cfg.replace(**NABLA_10S)
    model = randomize(CrossDiT(cfg), seed=0).to(device)
    gen = torch.Generator().manual_seed(1)
    if dtype != torch.float32:
        model.to_mixed_precision(dtype)
    model.eval()
    cond = (torch.randn(1, text_len, cfg.in_text_dim, generator=gen).to(device, dtype),
            torch.ones(1, text_len, dtype=torch.bool, device=device),
            torch.randn(1, cfg.in_text_dim2, generator=gen).to(device, dtype))
    uncond = (torch.randn(1, 24, cfg.in_text_dim, generator=gen).to(device, dtype),
              torch.ones(1, 24, dtype=torch.bool, device=device),
              torch.randn(1, cfg.in_text_dim2, generator=gen).to(device, dtype))
    noise = torch.randn(1, frames, h, w, 16, generator=gen).to(device)
    res = {**device_info(cuda), "steps": steps, "nfe": 2 * steps, "latent": [frames, h, w],
           "attention": cfg.attention_type}
    forced = args.force_total_density
    model.set_options(residual_dtype=torch.float32 if args.residual_fp32 else None,
                      nabla=NablaOptions(force_density=forced, force_total=forced is not None))
    res["residual_fp32"], res["force_total_density"] = args.residual_fp32, args.force_total_density
    if not args.no_compile:
        model.compile_blocks()
    kw = dict(latent_shape=noise.shape, cond=cond, uncond=uncond, guidance_scale=5.0, num_steps=steps, shift=10.0,
              noise=noise, progress=False)
    with torch.no_grad():
        sample(model, **{**kw, "num_steps": 1})  # compile warm-up
        sync()
        t0 = time.perf_counter()
        ours = sample(model, **kw)
        sync()
        res["ours_s"] = time.perf_counter() - t0
    print(json.dumps(res), flush=True)  # partial result first: the anchor's run is the long one
    if not args.no_diffusers:
        try:
            ref = diffusers_twin(cfg, model, device, dtype)
        except ImportError as err:  # the device image has no diffusers unless carried as a wheel
            res["diffusers"] = f"not importable: {err}"
        else:
            backend = args.diffusers_backend if cuda else "native"  # cuDNN is CUDA-only
            ref.set_attention_backend(backend)
            res["diffusers_backend"] = backend
            if not args.no_compile:
                ref.compile_repeated_blocks(fullgraph=False)
            # diffusers passes no text mask: give it the unpadded texts (same as ours after masking)
            with torch.no_grad():
                diffusers_loop(ref, noise, cond, uncond, 1, 10.0, 5.0, (1.0, 2.0, 2.0))
                sync()
                t0 = time.perf_counter()
                theirs = diffusers_loop(ref, noise, cond, uncond, steps, 10.0, 5.0, (1.0, 2.0, 2.0))
                sync()
                res["diffusers_loop_s"] = time.perf_counter() - t0
            res["speedup"] = res["diffusers_loop_s"] / res["ours_s"]
            res["latent_rel_diff"] = ((ours - theirs).norm() / theirs.norm()).item()
    tag = f"{args.seconds}s{'_nabla' if args.nabla else ''}{'_r32' if args.residual_fp32 else ''}"
    write_result(f"generation_{tag}.json", res)


if __name__ == "__main__":
    main()

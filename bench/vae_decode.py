"""HunyuanVideo VAE decoding of a 5 s 512×768 clip: diffusers' decode settings vs our chunked causal decoder.

Same process, same random weights (diffusers' default init of the production config) and the same random latents
(31×64×96, 16 channels); fp16; median of ``--reps`` decodes after a warm-up; peak = torch.cuda.max_memory_allocated
over the decodes (weights included). The anchor is diffusers at its fastest setting that fits in ``--budget-gb``
(40 GB): each of its settings is timed and the fastest that fits is named ``diffusers_best``; its default is
reported beside it. Deviation = max |pixel − whole-clip decode| (``CausalChunkDecoder.decode_whole_clip``:
diffusers' decoder with no tiling of any kind, GroupNorm and attention over every frame, convolutions exact in
slices), for diffusers' settings and ours alike.

diffusers settings: ``default`` (framewise: overlapping 17-frame temporal tiles, stride 12, blended; no spatial
tiles), ``tiled`` (``enable_tiling()``: also 256-px spatial tiles), ``t<N>`` (framewise with N-frame tiles and
stride N−4: fewer, longer tiles), ``tiled_t<N>`` (both). Ours: ``c<latent frames per chunk>``.

    python -m bench.vae_decode --whole-clip     # GPU: 31 latent frames -> 121 frames of 512x768
    python -m bench.vae_decode --smoke          # CPU: toy VAE, 5 latent frames -> 17 frames of 32x48
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench.common import CONV_KERNELS, device_info, kernel_breakdown, peak_gb, timed, write_result
from bench.vae_encode import vae_setup
from k5model.encoders.causal_encode import CausalChunkDecoder, set_decoder_memory_format


def configure_diffusers(vae, setting: str) -> None:
    """Put diffusers' VAE into one decode setting (see the module docstring)."""
    vae.use_framewise_decoding = True
    vae.disable_tiling()
    frames = 16
    for part in setting.split("_"):
        if part == "tiled":
            vae.enable_tiling()
        elif part.startswith("t") and part[1:].isdigit():
            frames = int(part[1:])
        elif part != "default":
            raise ValueError(f"unknown diffusers setting part {part!r} in {setting!r}")
    vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames = frames, frames - 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--diffusers", default="default,tiled,t32,t64", help="diffusers settings to time")
    ap.add_argument("--variants", default="c2,c4,c8", help="ours: c<latent frames per chunk>")
    ap.add_argument("--budget-gb", type=float, default=40.0, help="the anchor's memory budget")
    ap.add_argument("--whole-clip", action="store_true", help="deviations from the untiled whole-clip decode")
    ap.add_argument("--profile", action="store_true", help="kernel-time breakdown of our variants")
    args = ap.parse_args()
    cuda, device, dtype, vae = vae_setup(args.smoke)
    t, h, w = (31, 64, 96) if cuda else (5, 4, 6)
    reps = args.reps if cuda else 1
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, vae.config.latent_channels, t, h, w, generator=gen).to(device, dtype)
    res: dict = {**device_info(cuda), "latent": [t, h, w], "frames": (t - 1) * 4 + 1, "dtype": str(dtype),
                 "budget_gb": args.budget_gb}
    whole = None
    if args.whole_clip:
        with torch.no_grad():
            whole = CausalChunkDecoder(vae).decode_whole_clip(z).float()
        set_decoder_memory_format(vae, torch.contiguous_format)
        res["whole_clip_absmax"] = whole.abs().max().item()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def measure(name: str, fn) -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                out = fn()  # the warm-up's output is the one compared
                if whole is None:
                    del out
                res[f"{name}_s"] = timed(fn, reps, warmup=0)
        except torch.OutOfMemoryError as err:
            res[f"{name}_error"] = f"out of memory: {str(err)[:120]}"
            return
        res[f"{name}_peak_gb"] = peak_gb()
        if whole is not None:
            res[f"{name}_max_dev_vs_whole"] = (out.float() - whole).abs().max().item()
            del out
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print({k: v for k, v in res.items() if k.startswith(name)}, flush=True)

    for setting in filter(None, args.diffusers.split(",")):
        configure_diffusers(vae, setting)
        measure(f"diffusers_{setting}", lambda: vae.decode(z).sample)
    configure_diffusers(vae, "default")
    fits = [(res[f"diffusers_{s}_s"], s) for s in args.diffusers.split(",") if f"diffusers_{s}_s" in res
            and (not cuda or res[f"diffusers_{s}_peak_gb"] <= args.budget_gb)]
    best = min(fits)[1] if fits else None
    res["diffusers_best"] = best
    for variant in filter(None, args.variants.split(",")):
        dec = CausalChunkDecoder(vae, chunk_latent_frames=int(variant[1:]))
        name = f"ours_{variant}"
        measure(name, lambda dec=dec: dec.decode(z))
        if f"{name}_s" in res:
            for anchor in filter(None, {best, "default"}):
                if f"diffusers_{anchor}_s" in res:
                    res[f"{name}_speedup_vs_diffusers_{anchor}"] = res[f"diffusers_{anchor}_s"] / res[f"{name}_s"]
        if args.profile and cuda:
            with torch.no_grad():
                res[f"{name}_profile"] = kernel_breakdown(lambda dec=dec: dec.decode(z), CONV_KERNELS, 16)
        set_decoder_memory_format(vae, torch.contiguous_format)
        del dec
    write_result("vae_decode.json", res)


if __name__ == "__main__":
    main()

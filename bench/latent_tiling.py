"""Tile plans of ``k5data.latents.VIDEO_TILING`` against diffusers' default tiling of the HunyuanVideo VAE encoder.

For each resolution: encode seconds, peak GPU memory and the max / mean latent deviation (scaled latents) from a
reference encode (whole frames in diffusers' 16-frame temporal tiles; with ``--untiled-ref`` the whole clip at once,
where it fits). A plan with ``chunk_frames`` runs the chunked causal encoder. Random weights
at the real HunyuanVideo VAE size, fp16, 121 frames (5 s at 24 fps). Results are in the VIDEO_TILING comment::

    python -m bench.latent_tiling --sizes 256x384,512x768,1280x768,1408x640 --frames 121 --repeats 1   # GPU
    python -m bench.latent_tiling --sizes 256x384 --untiled-ref                                          # GPU
    python -m bench.latent_tiling --tiny --sizes 32x48 --frames 9 --device cpu                           # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _vae(tiny: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    kw = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4) if tiny else {}
    return AutoencoderKLHunyuanVideo(latent_channels=16, **kw).to(device, dtype).eval()


def _encode(video, x: torch.Tensor, device: str) -> tuple[torch.Tensor, float, float]:
    """Scaled latents of ``video`` (a VideoVAE: chunked, or diffusers' encode with its tiling attributes), seconds,
    peak GiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():
        z = video.encode(x)
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return z.float(), time.perf_counter() - t0, peak


def main() -> None:
    from k5data.latents.tiling import TilePlan, tile_plan
    from k5model.encoders.vae import VideoVAE

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256x384,512x768,1280x768")
    p.add_argument("--frames", type=int, default=121)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy-width VAE (CPU smoke)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--untiled-ref", action="store_true",
                   help="also encode all frames at once, no tiles, as the reference (needs the memory)")
    args = p.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    vae = _vae(args.tiny, dtype, args.device)
    video = VideoVAE(vae)
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        x = torch.rand(1, 3, args.frames, h, w, generator=torch.Generator().manual_seed(1)).mul(2).sub(1)
        x = x.to(args.device, dtype)
        plans = {"k5_plan": tile_plan(h, w), "diffusers_default": None, "whole_frames_16f": TilePlan(1, 1, 16, 12)}
        if args.untiled_ref:
            plans["untiled"] = None
        results = {}
        for name, plan in plans.items():
            if plan is not None:
                plan.configure(video, h, w)
            elif name == "untiled":
                video.use_diffusers_encoding()
                vae.use_framewise_encoding = vae.use_tiling = False
            else:  # exactly diffusers' enable_tiling() defaults: 256-px tiles every 192, 16 frames every 12
                video.use_diffusers_encoding()
                vae.use_framewise_encoding = True
                vae.enable_tiling(256, 256, 16, 192, 192, 12)
            _encode(video, x, args.device)  # warm-up (cuDNN autotune, allocator)
            best = min((_encode(video, x, args.device) for _ in range(args.repeats)), key=lambda r: r[1])
            results[name] = best
        ref_name = "untiled" if args.untiled_ref else "whole_frames_16f"
        ref = results[ref_name][0]
        for name, (z, seconds, peak) in results.items():
            print(json.dumps({"size": size, "frames": args.frames, "plan": name, "seconds": round(seconds, 3),
                              "peak_gib": round(peak, 2), "reference": ref_name,
                              "max_abs_dev": float((z - ref).abs().max()),
                              "mean_abs_dev": float((z - ref).abs().mean()),
                              "plan_detail": str(plans[name] or "256/192 px, 16/12 frames")}),
                  flush=True)


if __name__ == "__main__":
    main()

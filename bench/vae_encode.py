"""HunyuanVideo VAE encoding of a 5 s 512×768 clip: diffusers (tiled default, untiled) vs our chunked causal encoder.

Same process, same random weights (diffusers' default init of the production config) and the same random clip;
fp16; median of ``--reps`` encodes after a warm-up; peak = torch.cuda.max_memory_allocated over the encodes (weights
included). Deviation = max |latent mean − diffusers untiled latent mean| (and the same relative to the latents' max),
so the cost of chunking is visible next to the cost of diffusers' own tiling. The anchor (``diffusers_best``) is
diffusers' fastest setting within 40 GB among its default, ``enable_tiling()`` and longer temporal tiles.
Note that diffusers' "untiled" encode
still tiles in time (17-frame tiles, 4 overlapping frames blended) above 16 frames; ``--whole-clip`` adds the
deviation from the true whole-clip encode (``CausalChunkEncoder.encode_whole_clip``: GroupNorm and attention over
every frame, convolutions exact in 16-frame slices since cuDNN takes no single 121×512×768 input).

Variants of ours: ``c<chunk frames>[_compile][_ncdhw]``: channels-last-3d is the default layout, ``_ncdhw`` the
previous contiguous layout; ``_compile`` compiles the GroupNorm → SiLU → buffer write.

    python -m bench.vae_encode              # GPU: 121 frames, 512x768
    python -m bench.vae_encode --whole-clip # + deviation from the single-chunk encode of the whole clip
    python -m bench.vae_encode --smoke      # CPU: toy VAE, 17 frames, 64x96
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench.common import CONV_KERNELS, device_info, kernel_breakdown, peak_gb, timed, write_result
from k5model.encoders.causal_encode import CausalChunkEncoder, set_encoder_memory_format


def build_vae(smoke: bool):
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    if smoke:
        return AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)
    return AutoencoderKLHunyuanVideo()  # the HunyuanVideo / Kandinsky 5 video VAE layout


def vae_setup(smoke: bool) -> tuple[bool, torch.device, torch.dtype, torch.nn.Module]:
    """(cuda, device, dtype, VAE) of the VAE benchmarks: the production layout in fp16 on a GPU, the toy one in fp32
    on CPU (``smoke`` forces CPU)."""
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    return cuda, device, dtype, build_vae(not cuda).to(device, dtype).eval()


def deviation(res: dict, name: str, lat: torch.Tensor, ref: torch.Tensor) -> None:
    """max |Δ| of the latent means and the same relative to the reference's max |latent|."""
    res[f"{name}_max_dev"] = (lat.float() - ref).abs().max().item()
    res[f"{name}_rel_max_dev"] = res[f"{name}_max_dev"] / ref.abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="c16,c16_compile,c8,c8_compile,c16_ncdhw",
                    help="ours: c<chunk frames>[_compile][_ncdhw] (ncdhw = the previous contiguous layout)")
    ap.add_argument("--whole-clip", action="store_true",
                    help="also compare every variant with a single-chunk encode of the whole clip (needs ~45 GB)")
    ap.add_argument("--profile", action="store_true", help="kernel-time breakdown of each of our variants")
    ap.add_argument("--diffusers-frames", default="32,64",
                    help="diffusers with longer temporal tiles (N frames, stride N-4): candidates for the best anchor")
    args = ap.parse_args()
    cuda, device, dtype, vae = vae_setup(args.smoke)
    frames, h, w = (121, 512, 768) if cuda else (17, 64, 96)
    reps = args.reps if cuda else 1
    gen = torch.Generator().manual_seed(1)
    pixels = (torch.rand(1, 3, frames, h, w, generator=gen) * 2 - 1).to(device, dtype)
    res: dict = {**device_info(cuda), "frames": frames, "size": [h, w], "dtype": str(dtype)}

    def measure(name: str, fn) -> torch.Tensor | None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                res[f"{name}_s"] = timed(fn, reps, warmup=1)
                out = fn()
        except torch.OutOfMemoryError as err:
            res[f"{name}_error"] = f"out of memory: {str(err)[:120]}"
            return None
        res[f"{name}_peak_gb"] = peak_gb()
        return out

    with torch.no_grad():
        untiled = measure("diffusers_untiled", lambda: vae.encode(pixels).latent_dist.mode())
        vae.enable_tiling()
        tiled = measure("diffusers_tiled", lambda: vae.encode(pixels).latent_dist.mode())
        vae.disable_tiling()
        for n in (int(f) for f in filter(None, args.diffusers_frames.split(","))):
            # longer temporal tiles: fewer frames encoded twice, more memory (the anchor's best setting that fits)
            vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames = n, n - 4
            lat = measure(f"diffusers_t{n}", lambda: vae.encode(pixels).latent_dist.mode())
            if lat is not None:
                deviation(res, f"diffusers_t{n}", lat, untiled.float())
            del lat
        vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames = 16, 12
    anchors = [(res[f"{k}_s"], k) for k in ("diffusers_untiled", "diffusers_tiled",
                                            *(f"diffusers_t{n}" for n in args.diffusers_frames.split(",") if n))
               if f"{k}_s" in res and (not cuda or res[f"{k}_peak_gb"] <= 40)]
    res["diffusers_best"] = min(anchors)[1] if anchors else None
    untiled = untiled.float()
    res["latent_absmax"] = untiled.abs().max().item()
    deviation(res, "diffusers_tiled", tiled, untiled)
    latent_ch = untiled.shape[1]
    whole = None
    if args.whole_clip:  # GroupNorm and attention over every frame: what diffusers' temporal tiles approximate
        with torch.no_grad():
            whole = CausalChunkEncoder(vae).encode_whole_clip(pixels)[:, :latent_ch].float()
        res["whole_clip_absmax"] = whole.abs().max().item()
        for name, lat in (("diffusers_untiled", untiled), ("diffusers_tiled", tiled)):
            deviation(res, f"{name}_vs_whole", lat, whole)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    for variant in args.variants.split(","):
        parts = variant.split("_")
        enc = CausalChunkEncoder(vae, chunk_frames=int(parts[0][1:]), compile="compile" in parts,
                                 channels_last="ncdhw" not in parts)
        ours = measure(f"ours_{variant}", lambda enc=enc: enc.encode(pixels)[:, :latent_ch])
        deviation(res, f"ours_{variant}", ours, untiled)
        res[f"ours_{variant}_speedup_vs_tiled"] = res["diffusers_tiled_s"] / res[f"ours_{variant}_s"]
        if res["diffusers_best"]:
            res[f"ours_{variant}_speedup_vs_best"] = res[f"{res['diffusers_best']}_s"] / res[f"ours_{variant}_s"]
        if whole is not None:
            deviation(res, f"ours_{variant}_vs_whole", ours, whole)
        if args.profile and cuda:
            with torch.no_grad():
                res[f"ours_{variant}_profile"] = kernel_breakdown(lambda enc=enc: enc.encode(pixels), CONV_KERNELS, 20)
        set_encoder_memory_format(vae, torch.contiguous_format)  # the encoder converted the weights: back for the next
        del enc, ours
        gc.collect()
        print({k: v for k, v in res.items() if k.startswith(f"ours_{variant}")}, flush=True)
    write_result("vae_encode.json", res)


if __name__ == "__main__":
    main()

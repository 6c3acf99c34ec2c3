"""CrossDiT vs diffusers' Kandinsky5Transformer3DModel: one forward (one NFE) and one training step, same weights.

Same process, same inputs, median of ``--reps`` timed runs after warm-up, CUDA events. Prints absolute seconds,
ratios (diffusers / ours) and the relative error of each fast path against our plain fp32 reference path.

    python bench/crossdit_speed.py                      # H100: video_lite, 512x768, 5 s
    python bench/crossdit_speed.py --seconds 10 --nabla # 10 s with NABLA (P=0.9, STA 11/3/3)
    python bench/crossdit_speed.py --smoke              # CPU, tiny preset: the code path the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k5model import CrossDiT, get_preset  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def timed(fn, reps: int, warmup: int = 2) -> float:
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_flops(cfg, tokens: int, text_len: int) -> float:
    """Matmul + attention FLOPs of one forward (2 per multiply-add)."""
    d, f = cfg.model_dim, cfg.ff_dim
    per_block = 2 * tokens * (4 * d * d + 2 * d * f)  # self-attn qkvo + MLP
    per_block += 2 * tokens * 2 * d * d + 2 * text_len * 2 * d * d  # cross q,o on visual; k,v on text
    per_block += 4 * tokens * tokens * d + 4 * tokens * text_len * d  # self + cross attention scores/values
    return cfg.num_visual_blocks * per_block


def build_inputs(cfg, frames, h, w, text_len, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, frames, h, w, cfg.visual_embed_dim, generator=gen).to(device, dtype),
        encoder_hidden_states=torch.randn(1, text_len, cfg.in_text_dim, generator=gen).to(device, dtype),
        timestep=torch.tensor([700.0], device=device),
        pooled_projections=torch.randn(1, cfg.in_text_dim2, generator=gen).to(device, dtype),
        visual_rope_pos=[torch.arange(frames, device=device), torch.arange(h // 2, device=device),
                         torch.arange(w // 2, device=device)],
        text_rope_pos=torch.arange(text_len, device=device),
        scale_factor=(1.0, 2.0, 2.0),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--nabla", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--train", action="store_true", help="also time a training step")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        cfg = get_preset("video_lite")
        frames, h, w, text_len = args.seconds * 24 // 4 + 1, 64, 96, 256
    else:
        cfg = get_preset("tiny")
        frames, h, w, text_len = 3, 16, 16, 8
        args.reps = 2
    if args.nabla:
        cfg = cfg.replace(attention_type="nabla", attention_P=0.9, attention_wT=11, attention_wH=3, attention_wW=3,
                          attention_add_sta=True, attention_method="topcdf")
    tokens = frames * h * w // 4
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                 "preset": "video_lite" if cuda else "tiny", "frames_latent": frames, "tokens": tokens,
                 "attention": cfg.attention_type}
    gen = torch.Generator().manual_seed(0)
    ours = CrossDiT(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    ours = ours.to(device).eval()
    kw = build_inputs(cfg, frames, h, w, text_len, device, dtype)
    flops = forward_flops(cfg, tokens, text_len)
    res["forward_tflop"] = flops / 1e12

    # reference: our plain path in fp32 with math attention would not fit at 47k tokens; use SDPA fp32 instead
    with torch.no_grad():
        ours.float()
        kw32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
        ref = ours(**kw32).sample
        ours.to_mixed_precision(dtype) if dtype != torch.float32 else None

        ours.track_nabla_density = args.nabla
        out = ours(**kw).sample
        ours.track_nabla_density = False
        res["ours_eager_rel_err"] = rel(out, ref)
        res["ours_eager_s"] = timed(lambda: ours(**kw), args.reps)
        if args.nabla:
            res["nabla_density_cdf_rule"] = ours.last_nabla_density
            ours.nabla_force_density = 0.1
            ours.track_nabla_density = True
            ours(**kw)
            ours.track_nabla_density = False
            res["nabla_density_forced"] = ours.last_nabla_density
            res["ours_eager_forced10pct_s"] = timed(lambda: ours(**kw), args.reps)
            ours.nabla_force_density = None

    if not args.no_diffusers:
        try:
            from diffusers import Kandinsky5Transformer3DModel
        except ImportError as err:  # the device image has no diffusers unless carried as a wheel
            res["diffusers"] = f"not importable: {err}"
        else:
            dcfg = {k: v for k, v in cfg.to_dict().items()}
            ref_model = Kandinsky5Transformer3DModel(**dcfg)
            ref_model.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
            ref_model = ref_model.to(device, dtype).eval()
            for name, module in ref_model.named_modules():  # diffusers keeps these fp32 when loading in bf16
                if name.split(".")[-1] in Kandinsky5Transformer3DModel._keep_in_fp32_modules:
                    module.float()
            sparse = None
            if args.nabla:
                from diffusers import Kandinsky5T2VPipeline

                sta = Kandinsky5T2VPipeline.fast_sta_nabla(frames, h // 2 // 8, w // 2 // 8, 11, 3, 3, device=device)
                sparse = {"sta_mask": sta[None, None], "attention_type": "nabla", "to_fractal": True, "P": 0.9,
                          "wT": 11, "wH": 3, "wW": 3, "add_sta": True, "visual_shape": (frames, h // 2, w // 2),
                          "method": "topcdf"}
                ref_model.set_attention_backend("flex")
            with torch.no_grad():
                try:
                    dout = ref_model(**kw, sparse_params=sparse).sample
                    res["diffusers_eager_rel_err"] = rel(dout, ref)
                    res["diffusers_eager_s"] = timed(lambda: ref_model(**kw, sparse_params=sparse), args.reps)
                    res["speedup_vs_diffusers_eager"] = res["diffusers_eager_s"] / res["ours_eager_s"]
                except Exception as err:  # report, never hide: diffusers' NABLA path fails to compile on H100
                    res["diffusers_eager"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
                if not args.no_compile:
                    try:
                        ref_model.compile_repeated_blocks(fullgraph=False)
                        res["diffusers_compiled_s"] = timed(lambda: ref_model(**kw, sparse_params=sparse), args.reps)
                    except Exception as err:
                        res["diffusers_compiled"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
            del ref_model
    if not args.no_compile:
        ours.compile_blocks()
        with torch.no_grad():
            out = ours(**kw).sample
            res["ours_compiled_rel_err"] = rel(out, ref)
            res["ours_compiled_s"] = timed(lambda: ours(**kw), args.reps)
        res["ours_compiled_tflops"] = flops / res["ours_compiled_s"] / 1e12
        if "diffusers_compiled_s" in res:
            res["speedup_vs_diffusers_compiled"] = res["diffusers_compiled_s"] / res["ours_compiled_s"]
    if args.train:
        ours.float().train()  # fp32 master weights, bf16 autocast (the usual mixed-precision recipe)
        ours.enable_gradient_checkpointing(True)
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=cuda)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = ours(**kw).sample.float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res["train_step_s"] = timed(step, max(3, args.reps // 2), warmup=2)
        res["train_model_tflops"] = 3 * flops / res["train_step_s"] / 1e12
        if cuda:
            res["train_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        tag = f"speed_{args.seconds}s{'_nabla' if args.nabla else ''}.json"
        Path(os.environ["OUT"], tag).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

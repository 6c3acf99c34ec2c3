"""GPU verification of CrossDiT's attention paths, plus first timings.

Checks (each prints a relative error ‖a − b‖/‖b‖):
1. NABLA through FlexAttention (forward + backward) against the same block mask applied by masked SDPA.
2. Dense SDPA (flash/cuDNN) against the fp32 math reference.
3. Packed batches through the FlexAttention document mask against each sample alone.
Then times one forward of ``video_lite`` at 5 s 512×768 (dense) and at 10 s with NABLA.

    python -m bench.crossdit_gpu_check            # on a CUDA machine
    python -m bench.crossdit_gpu_check --smoke    # CPU, tiny shapes, same code paths where CPU allows
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import device_info, peak_gb, rel, timed, write_result
from k5model import CrossDiT, get_preset
from k5model.config import NABLA_10S
from k5model.runtime_options import AttentionOptions, NablaOptions
from k5model.synthetic import forward_inputs, randomize


def fwd_bwd(model, kw):
    model.zero_grad(set_to_none=True)
    x = kw["hidden_states"].clone().requires_grad_(True)
    out = model(**{**kw, "hidden_states": x}).sample
    out.float().square().mean().backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    return out.detach(), x.grad.detach(), grads


def check_nabla(device, dtype, smoke: bool) -> dict:
    cfg = get_preset("tiny" if smoke else "video_lite", num_visual_blocks=2, **NABLA_10S)
    model = CrossDiT(cfg).to(device)
    randomize(model)
    model.to_mixed_precision(dtype) if dtype != torch.float32 else None
    frames, h, w = (2, 16, 16) if smoke else (8, 64, 96)
    kw = forward_inputs(cfg, frames, h, w, 32, device=device, dtype=dtype)
    model.set_options(attention=AttentionOptions(backend="sdpa"))  # NABLA -> flex on CUDA ("auto")
    out_f, gx_f, g_f = fwd_bwd(model, kw)
    with torch.no_grad():  # inference takes the 64-token-block fast path on CUDA
        out_inf = model(**kw).sample
    model.set_options(attention=AttentionOptions(backend="math"))  # NABLA -> masked SDPA with the same block mask
    out_m, gx_m, g_m = fwd_bwd(model, kw)
    return {"nabla_out_rel": rel(out_f, out_m), "nabla_inference_out_rel": rel(out_inf, out_m),
            "nabla_input_grad_rel": rel(gx_f, gx_m),
            "nabla_param_grad_rel_max": max(rel(a, b) for a, b in zip(g_f, g_m)), "tokens": frames * h * w // 4}


def check_dense(device, dtype, smoke: bool) -> dict:
    cfg = get_preset("tiny" if smoke else "video_lite", num_visual_blocks=2)
    model = CrossDiT(cfg).to(device)
    randomize(model)
    kw = forward_inputs(cfg, 3, 32, 32, 32, device=device, dtype=torch.float32)
    with torch.no_grad():
        model.set_options(attention=AttentionOptions(backend="math"))
        ref = model(**kw).sample
        model.to_mixed_precision(dtype)
        model.set_options(attention=AttentionOptions(backend="sdpa"))
        kw16 = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v)
                for k, v in kw.items()}
        out = model(**kw16).sample
    return {"dense_sdpa_vs_fp32_math_rel": rel(out, ref)}


def check_packed(device, smoke: bool) -> dict:
    cfg = get_preset("tiny" if smoke else "video_lite", num_visual_blocks=2)
    model = CrossDiT(cfg).to(device)
    randomize(model)
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 16, 24), (1, 32, 16), (5, 8, 8)]
    lats = [torch.randn(*s, cfg.visual_embed_dim, generator=gen).to(device) for s in shapes]
    texts = [torch.randn(n, cfg.in_text_dim, generator=gen).to(device) for n in (17, 40, 5)]
    t = torch.tensor([100.0, 500.0, 900.0], device=device)
    pooled = torch.randn(3, cfg.in_text_dim2, generator=gen).to(device)
    if device.type == "cuda":
        model.set_options(attention=AttentionOptions(backend="flex"))
    with torch.no_grad():
        packed = model.forward_packed(lats, texts, t, pooled, scale_factor=(1.0, 2.0, 2.0))
        model.set_options(attention=AttentionOptions(backend="sdpa"))
        errs = []
        for i, (lat, txt) in enumerate(zip(lats, texts)):
            sizes = (lat.shape[0], lat.shape[1] // 2, lat.shape[2] // 2)
            alone = model(lat[None], txt[None], t[i:i + 1], pooled[i:i + 1],
                          [torch.arange(s, device=device) for s in sizes],
                          torch.arange(txt.shape[0], device=device), scale_factor=(1.0, 2.0, 2.0)).sample[0]
            errs.append(rel(packed[i], alone))
    return {"packed_flex_vs_alone_rel_max": max(errs)}


def time_forward(model, kw, reps: int) -> float:
    """Median seconds of one no-grad forward."""
    with torch.no_grad():
        return timed(lambda: model(**kw), reps)


def timings(device, has_nabla: bool) -> dict:
    res = {}
    cfg = get_preset("video_lite")
    model = CrossDiT(cfg).to(device)
    randomize(model)
    model.to_mixed_precision(torch.bfloat16).eval()
    kw = forward_inputs(cfg, 31, 64, 96, 256, device=device, dtype=torch.bfloat16)
    res["video_lite_5s_dense_forward_s"] = time_forward(model, kw, 5)
    kw10 = forward_inputs(cfg, 61, 64, 96, 256, device=device, dtype=torch.bfloat16)
    res["video_lite_10s_dense_forward_s"] = time_forward(model, kw10, 3)
    if not has_nabla:
        res["peak_mem_gb"] = peak_gb()
        return res
    model.config.attention_type = "nabla"
    model.config.attention_P, model.config.attention_wT = 0.9, 11
    model.config.attention_wH = model.config.attention_wW = 3
    model.config.attention_add_sta = True
    model.set_options(nabla=NablaOptions(force_density=0.1))
    res["video_lite_10s_nabla_forced10pct_forward_s"] = time_forward(model, kw10, 5)
    res["peak_mem_gb"] = peak_gb()
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    smoke = args.smoke or device.type == "cpu"
    results: dict = device_info(device.type == "cuda")
    try:
        import k5model.nabla  # noqa: F401

        has_nabla = True
    except ImportError:
        has_nabla = False
        results["nabla"] = "k5model.nabla not available; NABLA checks skipped"
    for dtype in (torch.float32, torch.bfloat16):
        if (smoke and dtype == torch.bfloat16) or not has_nabla:
            continue
        res = check_nabla(device, dtype, smoke)
        results.update({f"{k}_{str(dtype).split('.')[-1]}": v for k, v in res.items()})
    results.update(check_dense(device, torch.bfloat16 if device.type == "cuda" else torch.float32, smoke))
    results.update(check_packed(device, smoke))
    if device.type == "cuda" and not args.no_timing:
        t0 = time.time()
        results.update(timings(device, has_nabla))
        results["timing_wall_s"] = time.time() - t0
    write_result("crossdit_gpu_check.json", results)


if __name__ == "__main__":
    main()

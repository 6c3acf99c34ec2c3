"""Where the last milliseconds of a dense video_lite forward go: attention layout, q/k prep, GELU, host launch gaps.

Times, on the shapes of one 5 s 512×768 forward (47,616 tokens, 14 heads of 128):
- cuDNN / flash SDPA on (B, S, H, D)-strided views (what the model passes) and on contiguous (B, H, S, D) tensors;
- the q/k RMSNorm + RoPE: the model's composite path compiled, and the Triton kernel of ``k5model.kernels``;
- the exact GELU of the MLP: inductor's and the Triton kernel of ``k5model.kernels``;
- the whole compiled forward with either q/k path, launched from Python, and replayed from one captured CUDA graph
  (the difference is what host-side launching costs the GPU).

    python -m bench.dense_forward_probe            # GPU
    python -m bench.dense_forward_probe --smoke    # CPU, tiny shapes: the code path the tests run
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import device_info, timed, video_setup, write_result
from k5model import CrossDiT, kernels
from k5model import attention as attn_ops
from k5model.crossdit import Rope, norm_and_rope
from k5model.synthetic import forward_inputs, randomize


def sdpa_ms(q, k, v, backend, reps: int) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[backend]
    with sdpa_kernel([b]):
        return timed(lambda: F.scaled_dot_product_attention(q, k, v), reps) * 1e3


def qk_prep(q, k, wq, wk, rope: Rope):
    """The model's composite q/k path (Attention.forward without the Triton kernel)."""
    return norm_and_rope(q, wq, None, rope), norm_and_rope(k, wk, None, rope)


def graph_forward(model, kw):
    """Capture one forward in a CUDA graph (after side-stream warm-up, as the CUDA graph docs prescribe)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(**kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(**kw).sample
    return graph, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--skip-forward", action="store_true")
    args = ap.parse_args()
    cuda, device, dtype, cfg, (frames, h, w, text_len) = video_setup(args.smoke, args.seconds)
    reps = args.reps if cuda else 2
    s, heads, hd = frames * h * w // 4, cfg.model_dim // cfg.head_dim, cfg.head_dim
    res: dict = {**device_info(cuda), "tokens": s, "heads": heads}
    gen = torch.Generator().manual_seed(0)
    attn_tflop = 4 * s * s * cfg.model_dim / 1e12
    q, k, v = (torch.randn(1, s, heads, hd, generator=gen).to(device, dtype) for _ in range(3))
    if cuda:
        for backend in ("cudnn", "flash"):
            strided = sdpa_ms(*(t.transpose(1, 2) for t in (q, k, v)), backend, reps)
            contiguous = sdpa_ms(*(t.transpose(1, 2).contiguous() for t in (q, k, v)), backend, reps)
            res[f"sdpa_{backend}"] = {"bshd_view_ms": strided, "bhsd_contiguous_ms": contiguous,
                                      "bshd_tflops": attn_tflop / strided * 1e3,
                                      "bhsd_tflops": attn_tflop / contiguous * 1e3}
            print(res[f"sdpa_{backend}"], flush=True)
    else:
        res["sdpa_math_ms"] = timed(lambda: attn_ops.attention(q, k, v, backend="math"), reps) * 1e3

    angles = torch.rand(1, s, 1, hd // 2, generator=gen).to(device) * 6.28
    rope = Rope(angles.cos(), angles.sin())
    wq, wk = (torch.ones(hd, device=device, dtype=dtype) for _ in range(2))
    qk_bytes = 4 * q.numel() * q.element_size()
    composite = torch.compile(qk_prep, dynamic=False, options={"coordinate_descent_tuning": cuda})
    ms = timed(lambda: composite(q, k, wq, wk, rope), reps) * 1e3
    res["qk_prep_compiled_composite"] = {"ms": ms, "tb_s": qk_bytes / ms / 1e9}
    if cuda and kernels.TRITON_AVAILABLE:
        def fused():
            return (kernels.rms_norm_rope(q, wq, None, rope.cos, rope.sin),
                    kernels.rms_norm_rope(k, wk, None, rope.cos, rope.sin))
        ms = timed(fused, reps) * 1e3
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(fused(), composite(q, k, wq, wk, rope)))
        res["qk_prep_triton"] = {"ms": ms, "tb_s": qk_bytes / ms / 1e9, "max_abs_diff_vs_composite": diff}
    hidden = torch.randn(s, cfg.ff_dim, generator=gen).to(device, dtype)
    gelu = torch.compile(F.gelu, dynamic=False, options={"coordinate_descent_tuning": cuda})
    ms = timed(lambda: gelu(hidden), reps) * 1e3
    res["gelu"] = {"ms": ms, "tb_s": 2 * hidden.numel() * hidden.element_size() / ms / 1e9}
    if cuda and kernels.TRITON_AVAILABLE:
        ms = timed(lambda: kernels.gelu(hidden), reps) * 1e3
        out, ref = kernels.gelu(hidden), gelu(hidden)
        res["gelu_triton_poly_erf"] = {"ms": ms, "tb_s": 2 * hidden.numel() * hidden.element_size() / ms / 1e9,
                                       "bf16_outputs_differing_from_inductor": (out != ref).float().mean().item()}
    print(res, flush=True)
    q = k = v = hidden = None  # free the probe tensors before the model is built

    if not args.skip_forward:
        model = randomize(CrossDiT(cfg)).to(device).eval()
        if dtype != torch.float32:
            model.to_mixed_precision(dtype)
        model.compile_blocks()
        kw = forward_inputs(cfg, frames, h, w, text_len, device=device, dtype=dtype)
        with torch.no_grad():
            for enabled in (False, True) if cuda else (False,):
                kernels.ENABLED = enabled
                res[f"forward_{'triton_kernels' if enabled else 'composite'}_s"] = timed(lambda: model(**kw), reps)
                print(res, flush=True)
            t0 = time.perf_counter()
            model(**kw)
            res["forward_host_s"] = time.perf_counter() - t0  # host time to enqueue one forward
            if cuda:
                torch.cuda.synchronize()
                eager = model(**kw).sample.clone()
                try:
                    graph, out = graph_forward(model, kw)
                except RuntimeError as err:  # what stops capture is worth knowing too
                    res["forward_graph"] = f"capture failed: {str(err)[:300]}"
                else:
                    res["forward_graph_replay_s"] = timed(graph.replay, reps)
                    res["graph_max_abs_diff"] = (out.float() - eager.float()).abs().max().item()
    write_result(f"dense_forward_probe_{args.seconds}s.json", res)


if __name__ == "__main__":
    main()

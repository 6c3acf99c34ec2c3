"""Which FlexAttention tile sizes compile and run fastest for NABLA's 64-token block masks on this GPU.

Times forward and forward+backward of a (1, 28, 47616, 64) bf16 attention under a NABLA block mask at ~10% density
(+ STA), for 64-token full blocks with several kernel_options, against dense SDPA. CUDA only (Triton's do_bench).

    python -m bench.flex_tiles_probe
"""

from __future__ import annotations

import argparse
import json

import torch

from k5model import nabla

OPTIONS = {
    "fwd64": {"BLOCK_M": 64, "BLOCK_N": 64},
    "fwd64_bwd64": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64},
    "fwd64_bwd32": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help only; no options
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    dev = "cuda"
    T, H, W = (31, 32, 48)
    S = T * H * W
    q, k, v = (torch.randn(1, S, 28, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    sta = nabla.sta_block_mask(T, H // 8, W // 8, 11, 3, 3, device=dev)
    bm = nabla.nabla_block_mask(q, k, 0.9, sta=sta, force_density=0.1)
    res = {"S": S, "density": nabla.mask_density(bm)}
    fmask = nabla.to_flex_block_mask(bm, S, flex_block=64, exact_mask_mod=False)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
    res["dense_fwd_ms"] = do_bench(dense, return_mode="median")
    res["dense_fwdbwd_ms"] = do_bench(lambda: dense().sum().backward(), return_mode="median")
    # reference: the 128-token form (2x2 groups + exact mask_mod) that was verified against masked SDPA
    compiled = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        ref = compiled(qt, kt, vt, block_mask=nabla.to_flex_block_mask(bm, S, flex_block=128))
    for name, opts in OPTIONS.items():
        fn = torch.compile(flex_attention, dynamic=False)
        try:
            def f(fn=fn, opts=opts):
                return fn(qt, kt, vt, block_mask=fmask, kernel_options=opts)

            res[f"{name}_fwd_ms"] = do_bench(f, return_mode="median")
            with torch.no_grad():
                res[f"{name}_rel_vs_128"] = ((f() - ref).float().norm() / ref.float().norm()).item()
            res[f"{name}_fwdbwd_ms"] = do_bench(lambda f=f: f().sum().backward(), return_mode="median")
        except Exception as err:  # noqa: BLE001 - report which options do not compile
            res[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:160]}"
        torch.compiler.reset()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

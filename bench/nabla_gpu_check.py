"""NABLA on GPU: FlexAttention path against the masked-SDPA path, then timings against dense SDPA.

Checks (relative errors ‖a − b‖/‖b‖, outputs and q/k/v gradients):
1. ``nabla_attention(backend="flex")`` vs ``backend="sdpa_masked"`` on CUDA, fp32 and bf16, single and packed (two
   documents with doc_ids), each also against an fp32 reference that applies the same block mask.
2. Timing at a realistic size (Lite 10 s 512×768: 28 heads, D=64, 31×32×48 = 47,616 tokens, STA 11/3/3 and
   ``force_density=0.1``): mask build, flex kernel, full nabla_attention, dense SDPA; forward and forward+backward.

    python -m bench.nabla_gpu_check            # CUDA machine
    python -m bench.nabla_gpu_check --smoke    # CPU, tiny shapes (flex forward only: it has no CPU backward)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench.common import device_info, rel, timed, write_result
from k5model import attention as attn_ops
from k5model import nabla as N


def make_qkv(
    shapes: list[tuple[int, int, int]], heads: int, D: int, device: str, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k with block-level structure (so the pooled map is not flat), v plain; (1, S, heads, D) leaves."""
    g = torch.Generator().manual_seed(seed)
    S = sum(T * H * W for T, H, W in shapes)
    nb = S // N.BLOCK

    def qk() -> torch.Tensor:
        x = torch.randn(1, nb, N.BLOCK, heads, D, generator=g) + torch.randn(1, nb, 1, heads, D, generator=g)
        return x.reshape(1, S, heads, D)

    return tuple(
        t.to(device, dtype).requires_grad_(True) for t in (qk(), qk(), torch.randn(1, S, heads, D, generator=g))
    )


def run_paths(q, k, v, *, P, sta, doc_ids, backends, grad: bool) -> dict:
    """Outputs and grads of each backend, plus an fp32 reference with the first backend's block mask."""
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, q.dtype)
    res = {}
    mask = None
    for b in backends:
        for t in (q, k, v):
            t.grad = None
        with torch.set_grad_enabled(grad):
            out, m = N.nabla_attention(q, k, v, P=P, sta=sta, doc_ids=doc_ids, backend=b, return_mask=True)
            if grad:
                (out.float() * w.float()).sum().backward()
        res[b] = (out.detach(), [t.grad.detach().clone() for t in (q, k, v)] if grad else None)
        if mask is None:
            mask = m
        else:
            assert torch.equal(mask, m), "the two backends built different block masks"
    # fp32 reference: same block mask, dense masked attention in fp32
    q32, k32, v32 = (t.detach().float().requires_grad_(grad) for t in (q, k, v))
    with torch.set_grad_enabled(grad):
        ref = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q32, k32, v32)), attn_mask=N.expand_block_mask(mask)
        ).transpose(1, 2)
        if grad:
            (ref * w.float()).sum().backward()
    res["ref_fp32"] = (ref.detach(), [t.grad for t in (q32, k32, v32)] if grad else None)
    report = {"density": N.mask_density(mask, doc_ids)}
    for b in backends:
        report[f"{b}_vs_ref_out"] = rel(res[b][0], ref)
        if grad:
            report[f"{b}_vs_ref_grad_qkv"] = [rel(a, r) for a, r in zip(res[b][1], res["ref_fp32"][1])]
    if len(backends) == 2:
        a, b = backends
        report["flex_vs_sdpa_masked_out"] = rel(res[a][0], res[b][0])
        if grad:
            report["flex_vs_sdpa_masked_grad_qkv"] = [rel(x, y) for x, y in zip(res[a][1], res[b][1])]
    return report


def check(device: str, smoke: bool) -> dict:
    out = {}
    heads, D = (2, 16) if smoke else (4, 64)
    tok_grid = (2, 32, 32) if smoke else (4, 32, 32)  # latent-token grids; tiles = grid / 8 in H, W
    tiles = (tok_grid[0], tok_grid[1] // N.TILE, tok_grid[2] // N.TILE)
    packed_tiles = [(tiles[0], tiles[1], tiles[2] // 2), (tiles[0] // 2, tiles[1], tiles[2])]
    grad = device == "cuda"  # FlexAttention has no CPU backward
    dtypes = [torch.float32] if smoke else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        name = str(dtype).split(".")[-1]
        q, k, v = make_qkv([tok_grid], heads, D, device, dtype)
        sta = N.sta_block_mask(*tiles, 3, 3, 3, device=device)
        out[f"single_{name}"] = run_paths(
            q, k, v, P=0.7, sta=sta, doc_ids=None, backends=("flex", "sdpa_masked"), grad=grad
        )
        shapes = [(T, Ht * N.TILE, Wt * N.TILE) for T, Ht, Wt in packed_tiles]
        q, k, v = make_qkv(shapes, heads, D, device, dtype, seed=3)
        sta = N.packed_sta_block_mask(packed_tiles, 3, 3, 3, device=device)
        doc = N.block_document_ids(packed_tiles, device=device)
        out[f"packed_{name}"] = run_paths(
            q, k, v, P=0.7, sta=sta, doc_ids=doc, backends=("flex", "sdpa_masked"), grad=grad
        )
    if not smoke:
        # informational: the plain 64-token full-block BlockMask with 64-wide kernel tiles forced (not used by default)
        q, k, v = make_qkv([tok_grid], heads, D, device, torch.bfloat16)
        try:
            m = N.nabla_block_mask(q, k, 0.7)
            bm64 = N.to_flex_block_mask(m, q.shape[1])
            opts = {"BLOCK_M": 64, "BLOCK_N": 64}
            qt, kt, vt = (t.detach().transpose(1, 2) for t in (q, k, v))
            o = N._flex_fn("cuda")(qt, kt, vt, block_mask=bm64, kernel_options=opts).transpose(1, 2)
            ref = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=N.expand_block_mask(m)).transpose(1, 2)
            out["flex64_fwd_kernel_options_vs_sdpa"] = rel(o, ref)
        except Exception as e:
            out["flex64_fwd_kernel_options_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        # the model's default call: "auto" must pick flex on CUDA and support autograd
        q, k, v = make_qkv([tok_grid], heads, D, device, torch.bfloat16)
        o = N.nabla_attention(q, k, v, P=0.9, sta=N.sta_block_mask(*tiles, 11, 3, 3, device=device))
        o.float().sum().backward()
        out["auto_backward_ok"] = bool(q.grad is not None and torch.isfinite(q.grad).all())
    return out


def ms(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds per call (bench.common.timed)."""
    return timed(fn, reps, warmup) * 1e3


def bench(device: str, smoke: bool) -> dict:
    heads, D = (2, 16) if smoke else (28, 64)
    grid = (4, 32, 32) if smoke else (31, 32, 48)  # Lite 10 s 512x768: 47,616 tokens
    tiles = (grid[0], grid[1] // N.TILE, grid[2] // N.TILE)
    dtype = torch.float32 if smoke else torch.bfloat16
    q, k, v = make_qkv([grid], heads, D, device, dtype)
    sta = N.sta_block_mask(*tiles, 11, 3, 3, device=device)
    S = q.shape[1]
    res = {"S": S, "heads": heads, "D": D, "dtype": str(dtype), "sta_density": sta.float().mean().item()}
    fd = 0.1
    mask = N.nabla_block_mask(q, k, 0.9, sta=sta, force_density=fd)
    res["density_force0.1_plus_sta"] = N.mask_density(mask)
    res["density_P0.9_random_data_plus_sta"] = N.mask_density(N.nabla_block_mask(q, k, 0.9, sta=sta))
    res["ms_mask_build"] = ms(lambda: N.nabla_block_mask(q, k, 0.9, sta=sta, force_density=fd))
    fb = N.FLEX_BLOCK_CUDA if device == "cuda" else N.BLOCK
    res["flex_block"] = fb
    res["ms_mask_to_blockmask"] = ms(lambda: N.to_flex_block_mask(mask, S, flex_block=fb))
    backend = "flex" if device == "cuda" else "sdpa_masked"

    def nabla_fwd():
        with torch.no_grad():
            return N.nabla_attention(q, k, v, P=0.9, sta=sta, force_density=fd, backend=backend)

    def dense_fwd():
        with torch.no_grad():
            return attn_ops.attention(q, k, v)

    res["ms_nabla_fwd"] = ms(nabla_fwd)
    res["ms_dense_fwd"] = ms(dense_fwd)
    if device == "cuda":
        bm = N.to_flex_block_mask(mask, S, flex_block=fb)
        res["flex_partial_block_fraction"] = (
            bm.kv_num_blocks.sum() / (bm.kv_num_blocks + bm.full_kv_num_blocks).sum()
        ).item()
        flex = N._flex_fn("cuda")
        qt, kt, vt = (t.detach().transpose(1, 2) for t in (q, k, v))
        res["ms_flex_kernel_fwd"] = ms(lambda: flex(qt, kt, vt, block_mask=bm))

        def nabla_fb():
            o = N.nabla_attention(q, k, v, P=0.9, sta=sta, force_density=fd, backend="flex")
            o.sum().backward()

        def dense_fb():
            attn_ops.attention(q, k, v).sum().backward()

        res["ms_nabla_fwd_bwd"] = ms(nabla_fb, 5, warmup=2)
        res["ms_dense_fwd_bwd"] = ms(dense_fb, 5, warmup=2)
        # force_density alone (no STA): exactly 10% of the blocks
        res["density_force0.1_no_sta"] = N.mask_density(N.nabla_block_mask(q, k, 0.9, force_density=fd))
        res["ms_nabla_fwd_no_sta"] = ms(
            lambda: N.nabla_attention(q.detach(), k.detach(), v.detach(), P=0.9, force_density=fd))
        res["speedup_fwd"] = res["ms_dense_fwd"] / res["ms_nabla_fwd"]
        res["speedup_fwd_bwd"] = res["ms_dense_fwd_bwd"] / res["ms_nabla_fwd_bwd"]
        res["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    args = ap.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    report = device_info(device == "cuda")
    t0 = time.perf_counter()
    report["check"] = check(device, args.smoke)
    report["check_s"] = time.perf_counter() - t0
    print(json.dumps(report["check"], indent=1), flush=True)
    t0 = time.perf_counter()
    try:
        report["bench"] = bench(device, args.smoke)
    except Exception as e:  # keep the correctness results even if the large-size timing fails (e.g. OOM)
        report["bench_error"] = f"{type(e).__name__}: {e}"
    report["bench_s"] = time.perf_counter() - t0
    write_result("nabla_gpu_check.json", report)


if __name__ == "__main__":
    main()

"""The Triton inference kernels (q/k RMSNorm + RoPE, GELU) against the model's composite path (GPU only: CI has
none, the device runs these)."""

import pytest
import torch

from k5model import kernels
from k5model.crossdit import Attention, AttentionContext, FeedForward, Rope, norm_and_rope

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.TRITON_AVAILABLE), reason="needs CUDA and Triton")


@gpu
@pytest.mark.parametrize("batch,rope_batch,tokens,heads,head_dim,dtype", [
    (1, 1, 1000, 28, 64, torch.bfloat16),   # row count not a multiple of the kernel's block
    (2, 1, 257, 14, 128, torch.bfloat16),   # CFG batch sharing one table
    (2, 2, 64, 4, 64, torch.float32),       # per-sample tables (packed / different positions)
    (1, 0, 300, 28, 64, torch.bfloat16),    # cross-attention: norm only
])
def test_kernel_matches_composite(batch, rope_batch, tokens, heads, head_dim, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, tokens, heads, head_dim, device="cuda", generator=gen).to(dtype) * 3
    weight = (1 + 0.1 * torch.randn(head_dim, device="cuda", generator=gen)).to(dtype)
    rope = None
    if rope_batch:
        angles = torch.rand(rope_batch, tokens, 1, head_dim // 2, device="cuda", generator=gen) * 6.3
        rope = Rope(angles.cos(), angles.sin())
    want = norm_and_rope(x, weight, None, rope)
    got = kernels.rms_norm_rope(x, weight, None, *((rope.cos, rope.sin) if rope else ()))
    assert got.dtype == x.dtype and got.shape == x.shape
    if dtype == torch.bfloat16:
        # one rounding step of the output at most, and almost every element bit-identical
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7)
        assert (got != want).float().mean().item() < 0.01
    else:  # fp32: the kernel's rsqrt and fused multiply-adds differ from eager in the last bits only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@gpu
def test_gelu_matches_exact_gelu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 1001, 97, device="cuda", generator=gen) * 4  # size no multiple of any block
    torch.testing.assert_close(kernels.gelu(x), torch.nn.functional.gelu(x), rtol=1e-6, atol=1e-6)
    xb = x.to(torch.bfloat16)
    got, want = kernels.gelu(xb), torch.nn.functional.gelu(xb.float()).to(torch.bfloat16)
    # the polynomial erf is off by < 1.5e-7 absolute: visible only on the near-zero negative tail, where
    # fp32 cancellation in 1 + erf gives torch's own GELU (and inductor's) errors of the same size
    assert (got.float() - want.float()).abs().max().item() < 1e-5
    away_from_tail = want.float().abs() > 2 ** -6
    assert (got != want)[away_from_tail].float().mean().item() < 1e-3


@gpu
def test_attention_and_mlp_use_kernels_without_grad_and_composite_with_grad():
    torch.manual_seed(0)
    attn = Attention(256, 64).cuda().to(torch.bfloat16)
    ff = FeedForward(256, 1024).cuda().to(torch.bfloat16)
    x = torch.randn(1, 128, 256, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(1, 128, 1, 32, device="cuda") * 6.3
    rope = Rope(angles.cos(), angles.sin())
    ctx = AttentionContext()
    with torch.no_grad():
        fused, fused_ff = attn(x, ctx, rope=rope), ff(x)
        kernels.ENABLED = False
        try:
            plain, plain_ff = attn(x, ctx, rope=rope), ff(x)
        finally:
            kernels.ENABLED = True
        compiled, compiled_ff = torch.compile(attn)(x, ctx, rope=rope), torch.compile(ff)(x)
    for a, b in ((fused, plain), (compiled, fused), (fused_ff, plain_ff), (compiled_ff, fused_ff)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    out = attn(x.requires_grad_(), ctx, rope=rope)  # grad path: composite, differentiable
    out.float().square().mean().backward()
    assert attn.to_query.weight.grad is not None and torch.isfinite(attn.to_query.weight.grad).all()


def test_bad_shapes_are_named_before_any_kernel_runs():
    x = torch.zeros(1, 10, 2, 48)
    with pytest.raises(ValueError, match="power-of-two head_dim, got 48"):
        kernels.rms_norm_rope(x, torch.ones(48), None)
    x = torch.zeros(2, 10, 2, 64)
    with pytest.raises(ValueError, match="RoPE tables cover 7 tokens, q/k has 2x10"):
        kernels.rms_norm_rope(x, torch.ones(64), None, torch.zeros(1, 7, 1, 32), torch.zeros(1, 7, 1, 32))
    assert not kernels.usable(x) and not kernels.usable(torch.zeros(1, 2, 48), pow2_last_dim=True)

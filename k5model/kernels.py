"""Triton kernels for GPU inference: the per-head q/k RMSNorm + RoPE of an attention call, and the MLP's exact GELU.

Inductor's fusion of q/k RMSNorm and RoPE runs at a third of the card's copy bandwidth. :func:`rms_norm_rope` reads
each token's heads once, normalises them in fp32, rounds to the input dtype exactly where the model does, rotates the
pairs with the token's cos/sin (loaded once for all its heads) and writes them once.

Inductor's GELU is bound by libdevice's erf as much as by memory. :func:`gelu` computes the same exact-erf GELU with a
5-term polynomial erf (Abramowitz-Stegun 7.1.26, |error| < 1.5e-7, far below bf16's rounding step); rare bf16
outputs land one rounding step away from inductor's. Timings of both against the composite path:
docs/benchmarks.md ("Figures behind the code"; measured with ``python -m bench.dense_forward_probe``).

Neither has a backward: the model calls them where no gradient is needed and keeps the composite (inductor-fused)
path for training. They are ``torch.library.triton_op`` s, so compiled blocks trace straight through them; they are
defined at import so that dynamo never traces Triton's own Python.
"""

from __future__ import annotations

import importlib.util

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
# benchmarks switch the kernels off to time the composite path against them
ENABLED = True


def usable(x: torch.Tensor, pow2_last_dim: bool = False) -> bool:
    """Whether a kernel here may replace the composite path for ``x``: CUDA, Triton present, no gradient (and, for
    :func:`rms_norm_rope`, a power-of-two head_dim)."""
    if pow2_last_dim and x.shape[-1] & (x.shape[-1] - 1):
        return False
    return ENABLED and TRITON_AVAILABLE and x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.autotune(configs=[triton.Config({"TOKENS": t}, num_warps=w) for t in (1, 2, 4, 8) for w in (2, 4, 8)],
                     key=["tokens", "heads", "HALF", "HAS_ROPE"])
    @triton.jit
    def _norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, tokens, heads, rope_tokens, eps,
                          HALF: tl.constexpr, HEADS: tl.constexpr, TOKENS: tl.constexpr, HAS_ROPE: tl.constexpr):
        # one tile = TOKENS tokens x HEADS (heads rounded up to a power of two) x head_dim
        tok = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
        head = tl.arange(0, HEADS)
        col = tl.arange(0, 2 * HALF)
        keep = (tok < tokens)[:, None, None] & (head < heads)[None, :, None]
        offsets = (tok[:, None, None] * heads + head[None, :, None]) * (2 * HALF) + col[None, None, :]
        x = tl.load(x_ptr + offsets, mask=keep, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=2) / (2 * HALF) + eps)
        w = tl.load(w_ptr + col).to(tl.float32)
        # the model rounds the normalised q/k to the activation dtype before rotating them
        y = (x * rstd[:, :, None] * w[None, None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
        if HAS_ROPE:
            even, odd = tl.split(tl.reshape(y, (TOKENS, HEADS, HALF, 2)))
            pair = (tok % rope_tokens)[:, None] * HALF + tl.arange(0, HALF)[None, :]
            table_keep = (tok < tokens)[:, None]
            cos = tl.load(cos_ptr + pair, mask=table_keep, other=0.0)[:, None, :]
            sin = tl.load(sin_ptr + pair, mask=table_keep, other=0.0)[:, None, :]
            y = tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (TOKENS, HEADS, 2 * HALF))
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=keep)

    @triton_op("k5::rms_norm_rope", mutates_args=())
    def _rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                       has_rope: bool) -> torch.Tensor:
        out = torch.empty_like(x)
        heads, head_dim = x.shape[-2], x.shape[-1]
        tokens = x.numel() // (heads * head_dim)

        def grid(meta):
            return (triton.cdiv(tokens, meta["TOKENS"]),)

        wrap_triton(_norm_rope_kernel)[grid](x, weight, cos, sin, out, tokens, heads, max(cos.shape[0], 1), eps,
                                             HALF=head_dim // 2, HEADS=_next_pow2(heads), HAS_ROPE=has_rope)
        return out

    @triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)],
                     key=["n"])
    @triton.jit
    def _gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        x = tl.load(x_ptr + offs, mask=keep).to(tl.float32)
        a = tl.abs(x) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.3275911 * a)
        erf = 1.0 - t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))) \
            * tl.exp(-a * a)
        erf = tl.where(x < 0, -erf, erf)
        tl.store(out_ptr + offs, (0.5 * x * (1.0 + erf)).to(out_ptr.dtype.element_ty), mask=keep)

    @triton_op("k5::gelu", mutates_args=())
    def _gelu(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        n = x.numel()

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK"]),)

        wrap_triton(_gelu_kernel)[grid](x, out, n)
        return out


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float | None,
                  cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (B, S, heads, head_dim) -> RMSNorm over head_dim in fp32 (``eps`` None = fp32 machine epsilon, as
    ``nn.RMSNorm`` on an fp32 input), rounded to x's dtype, then rotated by the ``(B|1, S, 1, head_dim/2)`` cos/sin
    tables when given; returns x's dtype and shape."""
    if x.shape[-1] % 2 or x.shape[-1] & (x.shape[-1] - 1):
        raise ValueError(f"rms_norm_rope needs a power-of-two head_dim, got {x.shape[-1]}")
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    has_rope = cos is not None
    if has_rope:
        cos, sin = cos.reshape(-1, cos.shape[-1]).contiguous(), sin.reshape(-1, sin.shape[-1]).contiguous()
        if cos.shape[0] not in (x.shape[1], x.shape[0] * x.shape[1]):
            raise ValueError(f"RoPE tables cover {cos.shape[0]} tokens, q/k has {x.shape[0]}x{x.shape[1]}")
    else:  # the kernel never reads them; any fp32 tensor will do
        cos = sin = x.new_empty(0, dtype=torch.float32)
    return _rms_norm_rope(x.contiguous(), weight, cos, sin, float(eps), has_rope)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU in fp32, rounded to x's dtype."""
    return _gelu(x.contiguous())

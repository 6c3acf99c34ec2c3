"""Attention kernels behind one call: dense SDPA (flash / cuDNN / memory-efficient), FlexAttention, plain math.

Tensors are ``(B, S, heads, D)`` as the model produces them; the kernels want ``(B, heads, S, D)``.
Masks are boolean, ``True`` = may attend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex", "math")


@lru_cache(maxsize=1)
def _sdpa_priority():
    """cuDNN first on GPU: for these long bf16 sequences it is much faster than flash (docs/benchmarks.md)."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_priority(enabled: bool = True):
    """Context manager preferring cuDNN attention (no-op when disabled, e.g. on CPU)."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_sdpa_priority(), set_priority=True)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Dense attention. ``mask`` broadcasts to ``(B, heads, Sq, Sk)``."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "math":
        out = _math_attention(q, k, v, mask)
    else:
        # Flex has nothing to gain over SDPA without a sparse block structure; dense calls use SDPA.
        if q.is_cuda and not torch.compiler.is_compiling():
            with sdpa_priority():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # Inside a compiled block the context manager would break the graph; CrossDiT enters it around the
            # block loop instead, and the kernel choice is made under it when the graph is traced.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference attention in fp32, used to check the fast paths."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) key mask -> (B, 1, 1, L) for SDPA."""
    return None if mask is None else mask[:, None, None, :].bool()


def segment_ids(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Document id of every token of a packed sequence."""
    return torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.as_tensor(list(lengths), device=device)
    )


def document_mask(
    q_lengths: Sequence[int], k_lengths: Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Block-diagonal (Sq, Sk) mask: query of document i sees keys of document i only."""
    if len(q_lengths) != len(k_lengths):
        raise ValueError(f"packed query and key sides have {len(q_lengths)} vs {len(k_lengths)} documents")
    return segment_ids(q_lengths, device)[:, None] == segment_ids(k_lengths, device)[None, :]


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lengths: Sequence[int],
    k_lengths: Sequence[int],
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed attention on GPU without a dense S×S mask: a FlexAttention document mask_mod.

    ``key_valid`` (Sk,) bool drops padded keys (text padding inside a packed batch).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    qd = segment_ids(q_lengths, q.device)
    kd = segment_ids(k_lengths, q.device)

    def mask_mod(b, h, qi, ki):
        keep = qd[qi] == kd[ki]
        if key_valid is not None:
            keep = keep & key_valid[ki]
        return keep

    block_mask = create_block_mask(mask_mod, None, None, q.shape[1], k.shape[1], device=q.device)
    fn = _compiled_flex() if q.is_cuda else __import__(
        "torch.nn.attention.flex_attention", fromlist=["flex_attention"]
    ).flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)

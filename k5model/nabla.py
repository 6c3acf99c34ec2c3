"""NABLA: Neighborhood-Adaptive Block-Level Attention (Kandinsky 5.0 report §5.4), written from the description.

Idea
----
Video self-attention over tens of thousands of tokens is mostly spent on pairs that barely matter. NABLA guesses, per
layer, head and denoising step, which 64×64 blocks of the attention matrix carry the mass and computes only those:

1. Token layout ("fractal order"). The visual tokens of one sample, a ``(T, H, W)`` grid in raster order, are reordered
   to ``(T, H/8, W/8, 8, 8)``: every consecutive run of ``BLOCK = 64`` tokens is one 8×8 spatial tile of one latent
   frame, and tiles follow each other in ``(t, tile_row, tile_col)`` order. A 64-token block of the sequence is then a
   compact patch of the video, so block-level decisions make spatial sense. The model applies :func:`fractal_order`
   (or :func:`fractal_flatten`) once before the visual blocks, permutes its RoPE tables the same way, and undoes the
   permutation before the output layer. This equals diffusers' ``fractal_flatten(..., block_mask=True)``.
2. Cheap attention map. ``q`` and ``k`` (after RMSNorm and RoPE) are averaged over each 64-token block, giving one
   query and one key per block; ``softmax(q̄ k̄ᵀ / √D)`` over key blocks is a ``(nb, nb)`` map per head (in fp32).
3. Adaptive binarisation. In each row the block probabilities are sorted ascending and summed cumulatively; a block is
   kept when its cumulative value is ``≥ 1 − P``. That keeps the smallest set of largest blocks holding about a
   fraction ``P`` of the row's mass (plus the boundary block): peaked rows keep few blocks, flat rows keep many.
4. Sliding tile attention (STA). The data-driven mask is OR-ed with a fixed neighbourhood on the tile grid:
   ``|Δt| ≤ wT//2, |Δrow| ≤ wH//2, |Δcol| ≤ wW//2`` (official 10 s models: ``wT=11, wH=wW=3``), so local context is
   always available whatever the pooled map says.
5. Sparse kernel. On GPU the ``(B, heads, nb, nb)`` block mask becomes a FlexAttention ``BlockMask`` of 64-token
   full blocks (no mask_mod), run with 64-wide kernel tiles, forward and backward. Inductor's default H100 backward
   tiles for head_dim 64 are 128 wide and must divide the BlockMask's block size, so
   :func:`enable_64_token_flex_backward` adds a 64×64 backward config; where that hook is unavailable training falls
   back to 128-token kernel blocks (2×2 NABLA blocks, partial ones masked exactly by a mask_mod). On CPU
   (FlexAttention has no CPU backward) the block mask is expanded to a dense boolean mask for SDPA.

Packed sequences: several samples may be concatenated in one sequence, each in its own fractal order (so every
64-block belongs to exactly one sample). ``doc_ids`` (one id per block) restricts the map's softmax to the row's own
document and AND-s the final mask with "same document", which makes a packed call equal to separate calls.

Conventions: ``q, k, v`` are ``(B, S, heads, D)`` like the model produces them; block masks are ``(B, heads, nb, nb)``
bool with ``True`` = computed, rows = query blocks, columns = key blocks; ``S = 64·nb``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from k5model.torch_patches import enable_64_token_flex_backward

TILE = 8
BLOCK = TILE * TILE

BACKENDS = ("auto", "flex", "sdpa_masked")
# FlexAttention kernel block of the training fallback on CUDA (a 2x2 group of NABLA blocks); see to_flex_block_mask
FLEX_BLOCK_CUDA = 2 * BLOCK
# 64-wide tiles for every flex kernel on 64-token blocks (forward and the four backward tiles)
FLEX_KERNEL_OPTIONS_64 = {"BLOCK_M": BLOCK, "BLOCK_N": BLOCK, "BLOCK_M1": BLOCK, "BLOCK_N1": BLOCK,
                          "BLOCK_M2": BLOCK, "BLOCK_N2": BLOCK}


# ---------------------------------------------------------------------------------------------------------------------
# Token layout
def _check_grid(T: int, H: int, W: int, tile: int = TILE) -> None:
    if H % tile or W % tile or T < 1:
        raise ValueError(
            f"NABLA fractal order needs a (T, H, W) token grid with H and W multiples of {tile}, got {(T, H, W)}"
        )


def fractal_order(T: int, H: int, W: int, tile: int = TILE, device: torch.device | str | None = None) -> torch.Tensor:
    """Permutation ``order`` (T·H·W,) such that ``x_raster[:, order]`` is in fractal (tile-major) order."""
    _check_grid(T, H, W, tile)
    idx = torch.arange(T * H * W, device=device).view(T, H // tile, tile, W // tile, tile)
    # raster index of token (t, tile_row, tile_col, r, c) laid out tile-major
    return idx.permute(0, 1, 3, 2, 4).reshape(-1)


def fractal_flatten(x: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """(B, T, H, W, *rest) -> (B, T·H·W, *rest) in fractal order."""
    B, T, H, W = x.shape[:4]
    _check_grid(T, H, W, tile)
    rest = x.shape[4:]
    n = len(rest)
    x = x.reshape(B, T, H // tile, tile, W // tile, tile, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, 6 + n))
    return x.reshape(B, T * H * W, *rest)


def fractal_unflatten(x: torch.Tensor, shape: Sequence[int], tile: int = TILE) -> torch.Tensor:
    """Inverse of :func:`fractal_flatten`: (B, T·H·W, *rest) -> (B, T, H, W, *rest)."""
    T, H, W = (int(s) for s in shape)
    _check_grid(T, H, W, tile)
    if x.shape[1] != T * H * W:
        raise ValueError(f"sequence length {x.shape[1]} does not match grid {(T, H, W)}")
    B, rest = x.shape[0], x.shape[2:]
    n = len(rest)
    x = x.reshape(B, T, H // tile, W // tile, tile, tile, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, 6 + n))
    return x.reshape(B, T, H, W, *rest)


# ---------------------------------------------------------------------------------------------------------------------
# Fixed neighbourhood (STA) and documents
def sta_block_mask(
    T: int, Ht: int, Wt: int, wT: int, wH: int, wW: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(nb, nb) bool, nb = T·Ht·Wt tiles in (t, row, col) raster order: True inside the STA window."""
    t, r, c = torch.meshgrid(
        torch.arange(T, device=device), torch.arange(Ht, device=device), torch.arange(Wt, device=device), indexing="ij"
    )
    t, r, c = t.reshape(-1), r.reshape(-1), c.reshape(-1)

    def near(a: torch.Tensor, w: int) -> torch.Tensor:
        return (a[:, None] - a[None, :]).abs() <= w // 2

    return near(t, wT) & near(r, wH) & near(c, wW)


def packed_sta_block_mask(
    shapes: Sequence[tuple[int, int, int]], wT: int, wH: int, wW: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Block-diagonal STA for samples packed in one sequence; ``shapes`` are per-sample (T, Ht, Wt) tile grids."""
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    out = torch.zeros(total, total, dtype=torch.bool, device=device)
    start = 0
    for s, n in zip(shapes, sizes):
        out[start : start + n, start : start + n] = sta_block_mask(*s, wT, wH, wW, device=device)
        start += n
    return out


def block_document_ids(
    shapes: Sequence[tuple[int, int, int]], device: torch.device | str | None = None
) -> torch.Tensor:
    """Document id of every 64-token block of a packed sequence (per-sample (T, Ht, Wt) tile grids)."""
    sizes = torch.tensor([math.prod(s) for s in shapes], device=device)
    return torch.repeat_interleave(torch.arange(len(shapes), device=device), sizes)


def _same_document(doc_ids: torch.Tensor) -> torch.Tensor:
    return doc_ids[:, None] == doc_ids[None, :]


# ---------------------------------------------------------------------------------------------------------------------
# Block mask
@torch.no_grad()
def nabla_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    P: float,
    sta: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    force_density: float | None = None,
    force_total: bool = False,
) -> torch.Tensor:
    """(B, heads, nb, nb) bool block mask from q, k (B, S, heads, D) in fractal order, S a multiple of 64.

    ``force_density``: keep the top ``ceil(force_density · nb_doc)`` blocks of each row instead of the cumulative-mass
    rule (benchmarks on random weights, whose flat maps would otherwise keep almost everything); still OR-ed with STA.
    ``force_total``: the forced count includes the STA blocks (they rank first), so a row keeps
    ``max(ceil(force_density · nb_doc), its STA blocks)`` blocks in all — a total density, not an addition to STA.
    """
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, S, heads, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, S, Hh, D = q.shape
    if S % BLOCK:
        raise ValueError(f"NABLA needs a sequence length that is a multiple of {BLOCK}, got {S}")
    nb = S // BLOCK
    # one pooled query/key per 64-token block, accumulated in fp32 whatever the activations' dtype
    qa = q.detach().reshape(B, nb, BLOCK, Hh, D).mean(2, dtype=torch.float32).transpose(1, 2)
    ka = k.detach().reshape(B, nb, BLOCK, Hh, D).mean(2, dtype=torch.float32).transpose(1, 2)
    logits = (qa @ ka.transpose(-2, -1)) / math.sqrt(D)  # (B, heads, nb, nb)
    same = None
    if doc_ids is not None:
        if doc_ids.shape != (nb,):
            raise ValueError(f"doc_ids must have one id per 64-block ({nb},), got {tuple(doc_ids.shape)}")
        same = _same_document(doc_ids.to(q.device))
        # the map is a distribution over the row's own document only
        logits = logits.masked_fill(~same, float("-inf"))

    if force_density is None:
        probs = logits.softmax(-1)
        vals, inds = probs.sort(-1)
        keep = vals.cumsum(-1) >= 1.0 - P
        # the row's largest block always survives, so no row is empty because of rounding when P is tiny
        keep[..., -1] = True
    else:
        if not 0.0 < force_density <= 1.0:
            raise ValueError(f"force_density must be in (0, 1], got {force_density}")
        n_doc = same.sum(-1) if same is not None else torch.full((nb,), nb, device=q.device)
        # small epsilon so that e.g. 0.1·70 = 7.000000000000001 still gives 7 blocks
        k_row = torch.ceil(force_density * n_doc.double() - 1e-9).clamp_(min=1).to(torch.long)
        if force_total and sta is not None:
            logits = logits.masked_fill(sta.to(device=q.device, dtype=torch.bool), float("inf"))
        # top-k rather than a full sort (the mask is rebuilt in every layer of every forward); k from host-side sizes,
        # an upper bound of every row's count, so nothing synchronises with the GPU
        k_max = min(nb, math.ceil(force_density * nb - 1e-9))
        mask = torch.zeros(B, Hh, nb, nb, dtype=torch.bool, device=q.device)
        if same is None:
            # every row keeps exactly k_max blocks, so the top-k need not come back sorted (sorting cost a layer
            # about a millisecond at 10 s; docs/benchmarks.md)
            mask.scatter_(-1, logits.topk(k_max, dim=-1, sorted=False).indices, True)
        else:
            inds = logits.topk(k_max, dim=-1).indices
            keep = (torch.arange(k_max, device=q.device) < k_row[:, None]).expand(B, Hh, nb, k_max)
            mask.scatter_(-1, inds, keep)
    if force_density is None:
        mask = torch.empty(B, Hh, nb, nb, dtype=torch.bool, device=q.device).scatter_(-1, inds, keep)

    if sta is not None:
        mask |= sta.to(device=q.device, dtype=torch.bool)
    if same is not None:
        mask &= same
    return mask


def mask_density(block_mask: torch.Tensor, doc_ids: torch.Tensor | None = None) -> float:
    """Fraction of computed blocks; with ``doc_ids`` only within-document pairs count as possible."""
    if doc_ids is None:
        return block_mask.float().mean().item()
    same = _same_document(doc_ids.to(block_mask.device))
    possible = same.sum().item() * block_mask[..., 0, 0].numel()
    return (block_mask & same).sum().item() / possible


def expand_block_mask(block_mask: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(…, nb, nb) block mask -> (…, nb·block, nb·block) token mask."""
    *lead, nq, nk = block_mask.shape
    m = block_mask[..., :, None, :, None].expand(*lead, nq, block, nk, block)
    return m.reshape(*lead, nq * block, nk * block)


def _kv_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, n, m) bool -> per-row count and indices of kept columns, kept first in ascending order.

    A cumulative sum and one scatter instead of a sort (the mask is rebuilt in every layer). Entries past a row's
    count are unspecified; FlexAttention never reads them."""
    m = mask.shape[-1]
    count = mask.sum(-1, dtype=torch.int32)
    # kept column j goes to slot (number of kept columns before it); the others all land in the last slot, which is
    # past the row's count whenever any column is dropped
    slot = torch.where(mask, mask.cumsum(-1) - 1, m - 1)
    cols = torch.arange(m, dtype=torch.int32, device=mask.device).expand(mask.shape)
    idx = torch.zeros(mask.shape, dtype=torch.int32, device=mask.device).scatter_(-1, slot, cols)
    return count, idx


def to_flex_block_mask(
    block_mask: torch.Tensor,
    seq_len: int,
    doc_ids: torch.Tensor | None = None,
    flex_block: int = BLOCK,
    exact_mask_mod: bool | None = None,
    q_blocks: bool = True,
):
    """FlexAttention ``BlockMask`` from a (B, heads, nb, nb) block mask of 64-token blocks.

    ``flex_block == 64``: every kept block is a full block (each 64-block lies inside one document, so the compiled
    kernel needs no mask_mod). ``flex_block = 128`` (or another multiple of 64) groups 2×2 NABLA blocks into one kernel
    block: full where all four are kept, partial (a mask_mod reads the 64-level mask) where only some are. This exists
    because the compiled kernel's tile sizes must divide BLOCK_SIZE, and inductor's default H100 tiles are 128
    (bf16 forward 128×128, backward up to 128; fp32 forward 128×32), so a 64 BlockMask fails to compile there.

    The eager (uncompiled) FlexAttention, which is what runs on CPU, ignores the block structure and applies only
    mask_mod, so ``exact_mask_mod`` (default: on for CPU tensors; always on when flex_block > 64) adds the mask_mod.
    ``q_blocks=False`` skips the query-side index, which only the backward reads.
    """
    from torch.nn.attention.flex_attention import BlockMask, noop_mask

    B, Hh, nb, _ = block_mask.shape
    if seq_len != nb * BLOCK:
        raise ValueError(f"seq_len {seq_len} does not match {nb} blocks of {BLOCK}")
    if flex_block % BLOCK:
        raise ValueError(f"flex_block must be a multiple of {BLOCK}, got {flex_block}")
    if doc_ids is not None:
        block_mask = block_mask & _same_document(doc_ids.to(block_mask.device))
    r = flex_block // BLOCK
    if exact_mask_mod is None:
        exact_mask_mod = block_mask.device.type == "cpu"
    if r == 1:
        # every kept block is full: the partial set is empty (zeros shared by the kv and q sides)
        partial = None
        full = fine = block_mask
    else:
        # pad to whole kernel blocks with "not kept", so the mask_mod never indexes past the end
        nbp = -(-nb // r) * r
        fine = torch.zeros(B, Hh, nbp, nbp, dtype=torch.bool, device=block_mask.device)
        fine[..., :nb, :nb] = block_mask
        kept = fine.view(B, Hh, nbp // r, r, nbp // r, r).sum(dim=(3, 5), dtype=torch.int32)
        full = kept == r * r
        partial = (kept > 0) & ~full
        exact_mask_mod = True
    mask_mod = noop_mask
    if exact_mask_mod:

        def mask_mod(b, h, q_idx, kv_idx):
            return fine[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    # Built directly rather than through BlockMask.from_kv_blocks, whose query-side index (needed by the backward
    # only) is derived by sorting; here each side is a cumulative sum over the mask or its transpose.
    full_num, full_idx = _kv_blocks(full)
    full_q_num, full_q_idx = _kv_blocks(full.transpose(-1, -2)) if q_blocks else (None, None)
    if partial is None:
        kv_num, kv_idx = torch.zeros_like(full_num), torch.zeros_like(full_idx)
        q_num, q_idx = (kv_num, kv_idx) if q_blocks else (None, None)
    else:
        kv_num, kv_idx = _kv_blocks(partial)
        q_num, q_idx = _kv_blocks(partial.transpose(-1, -2)) if q_blocks else (None, None)
    return BlockMask(
        seq_lengths=(seq_len, seq_len),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(flex_block, flex_block),
        mask_mod=mask_mod,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Attention
def _flex_fn(device_type: str):
    if device_type == "cuda":
        # one compiled kernel shared with the dense document path (k5model.attention)
        from k5model.attention import _compiled_flex

        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


# Train through 64-token blocks too (exact full blocks, no mask_mod). Needs the backward config of
# k5model.torch_patches.enable_64_token_flex_backward; without it the 128-token fallback is used.
TRAIN_WITH_64_BLOCKS = True


def nabla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    P: float,
    sta: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    force_density: float | None = None,
    force_total: bool = False,
    backend: str = "auto",
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NABLA self-attention. q, k, v (B, S, heads, D) in fractal order -> (B, S, heads, D).

    backend: "flex" (FlexAttention BlockMask; compiled on CUDA), "sdpa_masked" (dense boolean mask, the CPU path
    since FlexAttention has no CPU backward), "auto" (flex on CUDA, sdpa_masked elsewhere). Gradients flow to q, k, v;
    the mask is a non-differentiable selection.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "flex" if q.is_cuda else "sdpa_masked"
    block_mask = nabla_block_mask(q, k, P, sta=sta, doc_ids=doc_ids, force_density=force_density,
                                  force_total=force_total)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "flex":
        if q.device.type == "cpu":
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                raise ValueError("backend='flex' has no backward on CPU; use backend='sdpa_masked' (or 'auto')")
            # flex refuses CPU inputs that merely carry requires_grad, even under no_grad
            qt, kt, vt = qt.detach(), kt.detach(), vt.detach()
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        kernel_options = None
        if q.is_cuda and (not needs_grad or (TRAIN_WITH_64_BLOCKS and enable_64_token_flex_backward())):
            # Exact 64-token full blocks with 64-wide tiles: several times faster than dense SDPA at NABLA densities,
            # where the 128-token form below is slower than dense (docs/benchmarks.md, NABLA attention kernels).
            flex_block, kernel_options = BLOCK, dict(FLEX_KERNEL_OPTIONS_64)
        elif q.is_cuda:
            # Training without the backward config hook: 128-token kernel blocks (2x2 NABLA blocks, partial ones
            # masked exactly by a mask_mod; see to_flex_block_mask).
            flex_block = FLEX_BLOCK_CUDA
        else:
            flex_block = BLOCK
        fmask = to_flex_block_mask(block_mask, q.shape[1], doc_ids, flex_block=flex_block, q_blocks=needs_grad)
        # The CPU path is eager on purpose (a correctness reference, not a fast path), so its "called without
        # torch.compile" warning is silenced; under compile the context manager would break the graph, and inside an
        # activation-checkpointed block one graph break makes dynamo run the whole block eagerly (unfused element-wise
        # kernels dominated a 10 s NABLA training step; docs/benchmarks.md).
        quiet = contextlib.nullcontext() if torch.compiler.is_compiling() else warnings.catch_warnings()
        with quiet:
            if not torch.compiler.is_compiling():
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            if kernel_options is None:
                out = _flex_fn(q.device.type)(qt, kt, vt, block_mask=fmask)
            else:
                out = _flex_fn(q.device.type)(qt, kt, vt, block_mask=fmask, kernel_options=kernel_options)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=expand_block_mask(block_mask))
    out = out.transpose(1, 2)
    return (out, block_mask) if return_mask else out


# ---------------------------------------------------------------------------------------------------------------------
# What a model's forward shares across its layers
@dataclass(frozen=True)
class NablaParams:
    """The sparsity rule of one model call: mass threshold ``P`` and the STA window in tiles (``add_sta`` off: none)."""

    P: float
    wT: int
    wH: int
    wW: int
    add_sta: bool = True


@dataclass
class NablaContext:
    """What every NABLA self-attention of one forward shares; built once per forward by :func:`nabla_context`."""

    P: float
    sta: torch.Tensor | None = None  # (nb, nb) STA block mask, block-diagonal when packed
    doc_ids: torch.Tensor | None = None  # packed: document id of every 64-block
    force_density: float | None = None  # see nabla_block_mask
    force_total: bool = False
    backend: str = "auto"  # nabla_attention's backend
    densities: list[float] | None = None  # opt-in: each layer's block density (reading it synchronises the GPU)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:func:`nabla_attention` under this context, recording the layer's density when tracked."""
        out, block_mask = nabla_attention(q, k, v, P=self.P, sta=self.sta, doc_ids=self.doc_ids,
                                          force_density=self.force_density, force_total=self.force_total,
                                          backend=self.backend, return_mask=True)
        if self.densities is not None:
            self.densities.append(mask_density(block_mask, self.doc_ids))
        return out

    def mean_density(self) -> float | None:
        """Mean recorded density over the layers run so far; None when nothing was recorded."""
        return sum(self.densities) / len(self.densities) if self.densities else None


def nabla_context(
    params: NablaParams,
    grids: Sequence[Sequence[int]],
    device: torch.device | str,
    *,
    force_density: float | None = None,
    force_total: bool = False,
    backend: str = "auto",
    track_density: bool = False,
) -> NablaContext:
    """Context for the visual tokens of one or more samples with ``(T, H, W)`` token grids, each in its own fractal
    order and concatenated in that order (several grids = a packed sequence)."""
    for g in grids:
        if g[1] % TILE or g[2] % TILE:
            raise ValueError(
                f"NABLA needs a token grid whose height and width are multiples of {TILE}, got {tuple(g)} "
                f"(pixel height/width must be multiples of {TILE * 16})"
            )
    tiles = [(g[0], g[1] // TILE, g[2] // TILE) for g in grids]
    sta = None
    if params.add_sta:
        if len(tiles) == 1:
            sta = sta_block_mask(*tiles[0], params.wT, params.wH, params.wW, device=device)
        else:
            sta = packed_sta_block_mask(tiles, params.wT, params.wH, params.wW, device=device)
    doc_ids = block_document_ids(tiles, device=device) if len(tiles) > 1 else None
    if torch.device(device).type == "cuda":
        # outside the compiled blocks: the hook imports and patches inductor, which dynamo would not trace
        enable_64_token_flex_backward()
    return NablaContext(P=params.P, sta=sta, doc_ids=doc_ids, force_density=force_density, force_total=force_total,
                        backend=backend, densities=[] if track_density else None)

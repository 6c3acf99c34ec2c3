"""NABLA block-sparse attention (k5model.nabla): layout, STA, block masks against loops and diffusers, attention
paths."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_kandinsky as dk
from diffusers.pipelines.kandinsky5.pipeline_kandinsky import Kandinsky5T2VPipeline

from k5model import nabla as N


def _qk(B: int, nb: int, heads: int, D: int, seed: int, spread: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random q, k (B, S, heads, D) whose 64-block means differ, so the pooled map is not flat and P matters."""
    g = torch.Generator().manual_seed(seed)

    def one() -> torch.Tensor:
        offset = torch.randn(B, nb, 1, heads, D, generator=g) * spread
        noise = torch.randn(B, nb, N.BLOCK, heads, D, generator=g)
        return (offset + noise).reshape(B, nb * N.BLOCK, heads, D)

    return one(), one()


def _reference_mask(
    q: torch.Tensor, k: torch.Tensor, P: float, sta: torch.Tensor | None, doc_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force in float64 with explicit loops. Returns the mask and |cumsum − (1−P)| of every (b, h, row, col)."""
    B, S, H, D = q.shape
    nb = S // N.BLOCK
    qd, kd = q.double(), k.double()
    mask = torch.zeros(B, H, nb, nb, dtype=torch.bool)
    margin = torch.full((B, H, nb, nb), math.inf, dtype=torch.float64)
    docs = [0] * nb if doc_ids is None else doc_ids.tolist()
    for b in range(B):
        for h in range(H):
            qbar = [qd[b, i * N.BLOCK : (i + 1) * N.BLOCK, h].mean(0) for i in range(nb)]
            kbar = [kd[b, j * N.BLOCK : (j + 1) * N.BLOCK, h].mean(0) for j in range(nb)]
            for i in range(nb):
                cols = [j for j in range(nb) if docs[j] == docs[i]]
                logits = torch.stack([qbar[i] @ kbar[j] for j in cols]) / math.sqrt(D)
                probs = torch.softmax(logits, 0).tolist()
                order = sorted(range(len(cols)), key=lambda c: probs[c])
                cum = 0.0
                for c in order:
                    cum += probs[c]
                    j = cols[c]
                    mask[b, h, i, j] = cum >= 1.0 - P
                    margin[b, h, i, j] = abs(cum - (1.0 - P))
                    if sta is not None and bool(sta[i, j]):
                        mask[b, h, i, j] = True
                        margin[b, h, i, j] = math.inf  # decided by STA, no rounding can flip it
    return mask, margin


def _assert_masks_agree(ours: torch.Tensor, ref: torch.Tensor, margin: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal, except possibly where the reference cumulative sum sits within rounding of the 1−P threshold."""
    diff = ours != ref
    assert (margin[diff] < tol).all(), f"{int(diff.sum())} blocks differ away from the threshold"
    assert diff.float().mean() < 0.01


# ---------------------------------------------------------------------------------------------------------------------
# layout
@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 16, 24), (3, 24, 16)])
def test_fractal_roundtrip_and_matches_diffusers(shape):
    T, H, W = shape
    x = torch.randn(2, T, H, W, 5)
    flat = N.fractal_flatten(x)
    assert torch.equal(N.fractal_unflatten(flat, shape), x)
    assert torch.equal(x.flatten(1, 3)[:, N.fractal_order(T, H, W)], flat)
    # each run of 64 tokens is one 8x8 tile of one frame
    assert torch.equal(flat[:, :64].reshape(2, 8, 8, 5), x[:, 0, :8, :8])

    d_flat, d_rope = dk.fractal_flatten(x, x, (2, T, H, W), block_mask=True)
    assert torch.equal(flat, d_flat) and torch.equal(flat, d_rope)
    assert torch.equal(dk.fractal_unflatten(flat, (2, T, H, W), block_mask=True), x)


def test_fractal_rejects_bad_grid():
    with pytest.raises(ValueError, match=r"\(2, 12, 16\)"):
        N.fractal_order(2, 12, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        N.fractal_flatten(torch.zeros(1, 1, 8, 10, 3))


# ---------------------------------------------------------------------------------------------------------------------
# STA
@pytest.mark.parametrize(
    "grid,win", [((3, 4, 5), (3, 3, 3)), ((5, 2, 6), (11, 3, 3)), ((4, 6, 3), (2, 4, 1)), ((2, 3, 3), (1, 1, 1))]
)
def test_sta_matches_diffusers(grid, win):
    ours = N.sta_block_mask(*grid, *win)
    ref = Kandinsky5T2VPipeline.fast_sta_nabla(*grid, *win, device="cpu")
    assert ours.dtype == torch.bool
    assert torch.equal(ours, ref.bool())


def test_packed_sta_and_doc_ids():
    shapes = [(2, 2, 3), (1, 3, 2)]
    packed = N.packed_sta_block_mask(shapes, 3, 3, 3)
    doc = N.block_document_ids(shapes)
    assert doc.tolist() == [0] * 12 + [1] * 6
    assert torch.equal(packed[:12, :12], N.sta_block_mask(2, 2, 3, 3, 3, 3))
    assert torch.equal(packed[12:, 12:], N.sta_block_mask(1, 3, 2, 3, 3, 3))
    assert not packed[:12, 12:].any() and not packed[12:, :12].any()


# ---------------------------------------------------------------------------------------------------------------------
# block mask
@pytest.mark.parametrize("P", [0.3, 0.7, 0.9])
@pytest.mark.parametrize("mode", ["plain", "sta", "docs"])
def test_block_mask_matches_loops(P, mode):
    q, k = _qk(B=2, nb=12, heads=2, D=16, seed=int(P * 10))
    sta = doc_ids = None
    if mode == "sta":
        sta = N.sta_block_mask(3, 2, 2, 3, 1, 1)
    elif mode == "docs":
        shapes = [(1, 2, 2), (2, 2, 2)]
        sta = N.packed_sta_block_mask(shapes, 1, 1, 3)
        doc_ids = N.block_document_ids(shapes)
    ours = N.nabla_block_mask(q, k, P, sta=sta, doc_ids=doc_ids)
    ref, margin = _reference_mask(q, k, P, sta, doc_ids)
    assert ours.shape == (2, 2, 12, 12) and ours.dtype == torch.bool
    _assert_masks_agree(ours, ref, margin)
    if doc_ids is not None:
        assert not ours[..., :4, 4:].any() and not ours[..., 4:, :4].any()
    assert 0.0 < N.mask_density(ours, doc_ids) < 1.0


def test_block_mask_density_grows_with_P():
    q, k = _qk(B=1, nb=16, heads=4, D=32, seed=3)
    dens = [N.mask_density(N.nabla_block_mask(q, k, P)) for P in (0.3, 0.7, 0.9, 0.99)]
    assert dens == sorted(dens) and dens[0] < dens[-1]
    assert N.mask_density(N.nabla_block_mask(q, k, 1.0)) == 1.0


@pytest.mark.parametrize("P", [0.5, 0.9])
def test_block_mask_matches_diffusers_nablaT_v2(P):
    q, k = _qk(B=1, nb=16, heads=3, D=32, seed=11)
    sta = N.sta_block_mask(4, 2, 2, 3, 1, 1)
    ref = dk.nablaT_v2(q, k, sta[None, None], thr=P).to_dense().bool()
    ours = N.nabla_block_mask(q, k, P, sta=sta)
    _, margin = _reference_mask(q, k, P, sta, None)
    assert ref.shape == ours.shape
    _assert_masks_agree(ours, ref, margin)
    # the mask must actually be sparse here, otherwise this comparison says little
    assert N.mask_density(ours) < 0.9


def test_flex_block_mask_roundtrip():
    q, k = _qk(B=2, nb=8, heads=2, D=16, seed=5)
    m = N.nabla_block_mask(q, k, 0.6)
    bm = N.to_flex_block_mask(m, 8 * N.BLOCK)
    assert bm.BLOCK_SIZE == (N.BLOCK, N.BLOCK)
    assert torch.equal(bm.to_dense().bool(), m)
    tok = N.expand_block_mask(m)
    assert tok.shape == (2, 2, 512, 512)
    assert torch.equal(tok[:, :, ::64, ::64], m) and torch.equal(tok[:, :, 63::64, 63::64], m)


def _materialize(bm, seq_len: int) -> torch.Tensor:
    """Token mask a block-sparse kernel computes: full blocks entirely, partial blocks through mask_mod, others not."""
    B, H = bm.kv_num_blocks.shape[:2]
    n = bm.kv_num_blocks.shape[-1]
    size = bm.BLOCK_SIZE[0]

    def dense(num, idx):
        out = torch.zeros(B, H, n, n, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                for i in range(n):
                    out[b, h, i, idx[b, h, i, : num[b, h, i]].long()] = True
        return out

    full = N.expand_block_mask(dense(bm.full_kv_num_blocks, bm.full_kv_indices), size)[..., :seq_len, :seq_len]
    part = N.expand_block_mask(dense(bm.kv_num_blocks, bm.kv_indices), size)[..., :seq_len, :seq_len]
    b, h, qi, ki = torch.meshgrid(
        torch.arange(B), torch.arange(H), torch.arange(seq_len), torch.arange(seq_len), indexing="ij"
    )
    return full | (part & bm.mask_mod(b, h, qi, ki))


@pytest.mark.parametrize("nb,docs", [(8, False), (7, False), (7, True)])
def test_flex_block_mask_128_reproduces_64_mask(nb, docs):
    q, k = _qk(B=2, nb=nb, heads=2, D=16, seed=nb)
    doc_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1]) if docs else None
    # tridiagonal STA, so some 2x2 groups are fully kept (full 128 blocks) next to partial ones
    sta = N.packed_sta_block_mask([(1, 1, 3), (1, 1, 4)] if docs else [(1, 1, nb)], 1, 1, 3)
    m = N.nabla_block_mask(q, k, 0.6, sta=sta, doc_ids=doc_ids)
    S = nb * N.BLOCK
    bm = N.to_flex_block_mask(m, S, doc_ids, flex_block=128)
    assert bm.BLOCK_SIZE == (128, 128)
    assert bm.full_kv_num_blocks.sum() > 0 and bm.kv_num_blocks.sum() > 0  # both kinds occur
    assert torch.equal(_materialize(bm, S), N.expand_block_mask(m))
    # the 64 form has only full blocks and needs no mask_mod on GPU
    bm64 = N.to_flex_block_mask(m, S, doc_ids, exact_mask_mod=False)
    assert bm64.kv_num_blocks.sum() == 0
    assert torch.equal(bm64.to_dense().bool(), m)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("K5_SLOW") != "1", reason="compiles FlexAttention for CPU (~20 s); set K5_SLOW=1")
def test_compiled_flex_on_cpu_honours_block_layout():
    """Compiled FlexAttention (unlike eager) skips blocks, so this checks both BlockMask forms through a real kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = torch.compile(flex_attention, dynamic=False)
    q, k = _qk(B=1, nb=7, heads=2, D=16, seed=4)
    v = torch.randn_like(q)
    m = N.nabla_block_mask(q, k, 0.5, sta=N.sta_block_mask(1, 1, 7, 1, 1, 3))
    ref = N.nabla_attention(q, k, v, P=0.5, sta=N.sta_block_mask(1, 1, 7, 1, 1, 3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    for bm in (N.to_flex_block_mask(m, 448, flex_block=128), N.to_flex_block_mask(m, 448, exact_mask_mod=False)):
        with torch.no_grad():
            out = fn(qt, kt, vt, block_mask=bm).transpose(1, 2)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_force_density():
    g = torch.Generator().manual_seed(0)
    # near-flat map, like random weights: the CDF rule would keep almost everything
    q, k = (torch.randn(1, 40 * N.BLOCK, 2, 16, generator=g) * 0.01 for _ in range(2))
    assert N.mask_density(N.nabla_block_mask(q, k, 0.9)) > 0.8
    m = N.nabla_block_mask(q, k, 0.9, force_density=0.1)
    assert (m.sum(-1) == 4).all()
    assert abs(N.mask_density(m) - 0.1) < 1e-6
    shapes = [(1, 2, 10), (3, 2, 5)]  # 20 + 30 blocks
    q2, k2 = (torch.randn(1, 50 * N.BLOCK, 2, 16, generator=g) for _ in range(2))
    doc = N.block_document_ids(shapes)
    m2 = N.nabla_block_mask(q2, k2, 0.9, doc_ids=doc, force_density=0.1)
    assert (m2[..., :20, :].sum(-1) == 2).all() and (m2[..., 20:, :].sum(-1) == 3).all()
    assert abs(N.mask_density(m2, doc) - 0.1) < 1e-6
    sta = N.packed_sta_block_mask(shapes, 1, 1, 3)
    m3 = N.nabla_block_mask(q2, k2, 0.9, sta=sta, doc_ids=doc, force_density=0.1)
    assert (m3 >= sta).all() and 0.1 < N.mask_density(m3, doc) < 0.2


# ---------------------------------------------------------------------------------------------------------------------
# attention
def _leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("P,full_sta", [(1.0, False), (0.3, True)])
def test_full_mask_equals_dense_sdpa(P, full_sta):
    q, k = _qk(B=2, nb=6, heads=2, D=16, seed=7)
    v = torch.randn_like(q)
    sta = torch.ones(6, 6, dtype=torch.bool) if full_sta else None
    w = torch.randn_like(q)
    a = _leaves(q, k, v)
    out, m = N.nabla_attention(*a, P=P, sta=sta, return_mask=True)
    assert m.all()
    (out * w).sum().backward()
    b = _leaves(q, k, v)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in b)).transpose(1, 2)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=0)


def test_sparse_mask_actually_changes_output():
    q, k = _qk(B=1, nb=6, heads=2, D=16, seed=8)
    v = torch.randn_like(q)
    out, m = N.nabla_attention(q, k, v, P=0.3, return_mask=True)
    assert not m.all()
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert (out - dense).abs().max() > 1e-3


def test_packed_equals_separate():
    shapes_tok = [(1, 16, 8), (2, 8, 16)]  # token grids -> tile grids (1, 2, 1) and (2, 1, 2)
    tiles = [(T, H // N.TILE, W // N.TILE) for T, H, W in shapes_tok]
    g = torch.Generator().manual_seed(1)
    heads, D, P = 2, 16, 0.6
    docs = []
    for T, Ht, Wt in tiles:
        nb = T * Ht * Wt
        q, k = _qk(B=1, nb=nb, heads=heads, D=D, seed=nb)
        docs.append(_leaves(q, k, torch.randn(1, nb * N.BLOCK, heads, D, generator=g)))
    ws = [torch.randn_like(d[0]) for d in docs]

    outs, masks = [], []
    for (q, k, v), t, w in zip(docs, tiles, ws):
        o, m = N.nabla_attention(q, k, v, P=P, sta=N.sta_block_mask(*t, 1, 1, 1), return_mask=True)
        (o * w).sum().backward()
        outs.append(o)
        masks.append(m)

    packed = _leaves(*(torch.cat([d[i] for d in docs], dim=1) for i in range(3)))
    sta = N.packed_sta_block_mask(tiles, 1, 1, 1)
    doc_ids = N.block_document_ids(tiles)
    out, m = N.nabla_attention(*packed, P=P, sta=sta, doc_ids=doc_ids, return_mask=True)
    (out * torch.cat(ws, dim=1)).sum().backward()

    assert torch.equal(m[..., :2, :2], masks[0]) and torch.equal(m[..., 2:, 2:], masks[1])
    assert not m[..., :2, 2:].any()
    torch.testing.assert_close(out, torch.cat(outs, dim=1), atol=1e-5, rtol=0)
    for i in range(3):
        torch.testing.assert_close(packed[i].grad, torch.cat([d[i].grad for d in docs], dim=1), atol=1e-5, rtol=0)


def test_flex_forward_on_cpu_matches_sdpa_masked():
    shapes = [(1, 2, 2), (2, 2, 2)]
    q, k = _qk(B=2, nb=12, heads=2, D=16, seed=9)
    v = torch.randn_like(q)
    sta = N.packed_sta_block_mask(shapes, 1, 1, 3)
    doc_ids = N.block_document_ids(shapes)
    try:
        flex, m = N.nabla_attention(q, k, v, P=0.5, sta=sta, doc_ids=doc_ids, backend="flex", return_mask=True)
    except (NotImplementedError, RuntimeError) as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"FlexAttention forward does not run on CPU in this torch build: {e}")
    ref = N.nabla_attention(q, k, v, P=0.5, sta=sta, doc_ids=doc_ids, backend="sdpa_masked")
    assert not m.all()
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=0)
    # FlexAttention has no CPU backward: the flex backend says so instead of failing deep inside torch
    with pytest.raises(ValueError, match="no backward on CPU"):
        N.nabla_attention(*_leaves(q, k, v), P=0.5, backend="flex")


def test_bad_inputs():
    q = torch.randn(1, 100, 2, 8)
    with pytest.raises(ValueError, match="multiple of 64"):
        N.nabla_block_mask(q, q, 0.9)
    q = torch.randn(1, 128, 2, 8)
    with pytest.raises(ValueError, match="backend"):
        N.nabla_attention(q, q, q, P=0.9, backend="nope")


def _dense_of(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    n = idx.shape[-1]
    valid = torch.arange(n) < num[..., None]
    out = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool)
    return out.scatter_(-1, torch.where(valid, idx.long(), n), True)[..., :n]


@pytest.mark.parametrize("flex_block", [64, 128])
def test_flex_block_mask_query_side_is_the_transpose(flex_block):
    """The backward reads the query-side index; ours comes from a cumulative sum over the transposed mask."""
    q, k = _qk(B=2, nb=7, heads=3, D=16, seed=11)
    m = N.nabla_block_mask(q, k, 0.6, sta=N.sta_block_mask(1, 1, 7, 1, 1, 3))
    bm = N.to_flex_block_mask(m, 7 * N.BLOCK, flex_block=flex_block)
    for kv_num, kv_idx, q_num, q_idx in ((bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices),
                                         (bm.full_kv_num_blocks, bm.full_kv_indices, bm.full_q_num_blocks,
                                          bm.full_q_indices)):
        kv = _dense_of(kv_num, kv_idx)
        assert torch.equal(_dense_of(q_num, q_idx), kv.transpose(-1, -2))
        # kept indices come first, ascending, as torch's own construction orders them
        first = torch.where(torch.arange(kv_idx.shape[-1]) < kv_num[..., None], kv_idx, torch.iinfo(torch.int32).max)
        assert torch.equal(first.sort(-1).values, first)
    if flex_block == 64:
        assert torch.equal(_dense_of(bm.full_kv_num_blocks, bm.full_kv_indices), m)
    no_q = N.to_flex_block_mask(m, 7 * N.BLOCK, flex_block=flex_block, q_blocks=False)
    assert no_q.q_indices is None and torch.equal(no_q.full_kv_indices, bm.full_kv_indices)


def test_forced_density_top_k_matches_a_full_sort():
    q, k = _qk(B=1, nb=20, heads=2, D=16, seed=12)
    sta = N.sta_block_mask(1, 4, 5, 1, 3, 3)
    for total in (False, True):
        m = N.nabla_block_mask(q, k, 0.9, sta=sta, force_density=0.25, force_total=total)
        logits = q.reshape(1, 20, 64, 2, 16).mean(2).transpose(1, 2) @ k.reshape(1, 20, 64, 2, 16).mean(2).permute(
            0, 2, 3, 1)
        if total:
            logits = logits.masked_fill(sta, float("inf"))
        order = logits.argsort(-1, descending=True)[..., :5]
        ref = torch.zeros_like(m).scatter_(-1, order, True) | sta
        assert torch.equal(m, ref)


@pytest.mark.parametrize("force", [None, 0.5])
def test_nabla_attention_traces_without_graph_breaks(force):
    """A graph break inside an activation-checkpointed compiled block makes dynamo run the whole block eagerly."""
    q, k = _qk(B=1, nb=4, heads=2, D=16, seed=13)
    v = torch.randn_like(q)
    sta = N.sta_block_mask(1, 2, 2, 1, 3, 3)

    def attend(q, k, v):
        return N.nabla_attention(q, k, v, P=0.9, sta=sta, force_density=force, force_total=force is not None,
                                 backend="flex")

    with torch.no_grad():
        explained = torch._dynamo.explain(attend)(q, k, v)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]

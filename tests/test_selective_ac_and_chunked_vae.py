"""Selective activation checkpointing (attention saved, not recomputed), NABLA's total-density forcing, and the
chunked causal VAE encoder (exact convolutions across chunks; one chunk = diffusers' untiled encode)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize, small_forward_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from k5model import CrossDiT, get_preset
from k5model import nabla as N
from k5model.encoders.causal_encode import CausalChunkEncoder, _StreamConv
from k5model.training.parallel import apply_activation_checkpointing


class _CountAttention(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name and "backward" not in name:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_saves_attention_and_keeps_gradients():
    cfg = get_preset("tiny")
    base = randomize(CrossDiT(cfg), std=0.02, seed=0)
    kw = small_forward_inputs(cfg, batch=1, height=16, width=16, text_len=8, seed=0, timestep=500.0)
    grads, calls = {}, {}
    for frac in (None, 0.0, 1.0):
        model = copy.deepcopy(base)
        if frac is not None:
            apply_activation_checkpointing(model, save_attention=frac)
        with _CountAttention() as counter:
            model(**kw).sample.square().mean().backward()
        calls[frac] = counter.calls
        grads[frac] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert calls[0.0] == 2 * calls[None]  # full checkpointing recomputes every attention in backward
    assert calls[1.0] == calls[None]  # selective: attention outputs were saved
    assert torch.equal(grads[None], grads[0.0]) and torch.equal(grads[None], grads[1.0])
    with pytest.raises(ValueError, match="fraction"):
        apply_activation_checkpointing(copy.deepcopy(base), save_attention=1.5)


def test_force_total_density_counts_sta_blocks():
    g = torch.Generator().manual_seed(0)
    T, H, W = 4, 4, 4  # tile grid -> 64 blocks
    q, k = (torch.randn(1, T * H * W * 64, 2, 16, generator=g) for _ in range(2))
    sta = N.sta_block_mask(T, H, W, 3, 1, 1)
    m = N.nabla_block_mask(q, k, 0.9, sta=sta, force_density=0.25, force_total=True)
    per_row = m.sum(-1)
    assert bool((m | sta == m).all())  # STA always kept
    assert bool((per_row == torch.maximum(torch.full_like(per_row, 16), sta.sum(-1))).all())
    added = N.nabla_block_mask(q, k, 0.9, sta=sta, force_density=0.25)
    assert N.mask_density(added) > N.mask_density(m)


@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 2, 2), (1, 2, 2)])
def test_streamed_causal_conv_is_exact(stride):
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoCausalConv3d

    torch.manual_seed(0)
    conv = HunyuanVideoCausalConv3d(3, 5, 3, stride)
    x = torch.randn(1, 3, 17, 16, 24)
    stream, parts, start = _StreamConv(conv), [], 0
    for n in (5, 4, 3, 4, 1):  # uneven chunks, one too short to emit a strided output on its own
        out = stream(x[:, :, start:start + n])
        start += n
        if out is not None:
            parts.append(out)
    with torch.no_grad():
        assert torch.equal(torch.cat(parts, 2), conv(x))


def test_one_chunk_equals_untiled_encode_and_chunks_stay_close_in_shape():
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4,
                                    latent_channels=4).eval()
    x = torch.rand(1, 3, 17, 32, 48) * 2 - 1
    vae.use_framewise_encoding = False
    with torch.no_grad():
        ref = vae._encode(x)
    one = CausalChunkEncoder(vae, chunk_frames=16).encode(x)
    assert (one - ref).abs().max() < 1e-5
    many = CausalChunkEncoder(vae, chunk_frames=4).encode(x)
    assert many.shape == ref.shape and torch.isfinite(many).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        CausalChunkEncoder(vae, chunk_frames=6)

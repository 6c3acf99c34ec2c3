"""The fast chunked causal encoder (channels-last buffers written in place, reduction-based GroupNorm) against the
straightforward maths it replaced: F.group_norm → SiLU → F.pad(replicate) → torch.cat(cache, chunk) per causal conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k5model.encoders.causal_encode import CausalChunkEncoder, _StreamConv, group_norm


def _tiny_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4,
                                     latent_channels=4).eval()


class _RefConv:
    """The previous implementation of a streamed causal conv: pad and concatenate, cache = trailing input frames."""

    def __init__(self, causal_conv):
        self.conv, self.cache = causal_conv.conv, None
        pw0, pw1, ph0, ph1, self.front, _ = causal_conv.time_causal_padding
        self.spatial = (pw0, pw1, ph0, ph1)

    def __call__(self, x, norm=None):
        if norm is not None:
            x = F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))
        if any(self.spatial):
            x = F.pad(x, (*self.spatial, 0, 0), mode="replicate")
        if self.cache is not None:
            x = torch.cat([self.cache, x], dim=2)
        elif self.front:
            x = torch.cat([x[:, :, :1]] * self.front + [x], dim=2)
        kt, st = self.conv.kernel_size[0], self.conv.stride[0]
        n = (x.shape[2] - kt) // st + 1 if x.shape[2] >= kt else 0
        self.cache = x[:, :, n * st:]
        return self.conv(x[:, :, : (n - 1) * st + kt]) if n else None


def _reference_encode(vae, pixels, chunk):
    enc = vae.encoder
    convs = {id(m): _RefConv(m) for m in enc.modules() if hasattr(m, "time_causal_padding")}

    def resnet(block, x):
        h = convs[id(block.conv2)](convs[id(block.conv1)](x, block.norm1), block.norm2)
        return h + (x if block.conv_shortcut is None else convs[id(block.conv_shortcut)](x))

    def attention(attn, x):
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
        normed = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        q, k, v = (lin(normed).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                   for lin in (attn.to_q, attn.to_k, attn.to_v))
        hw = h * w
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, f * hw:(f + 1) * hw], k[:, :, :(f + 1) * hw],
                                                        v[:, :, :(f + 1) * hw]) for f in range(t)], dim=2)
        out = attn.to_out[0](out.transpose(1, 2).flatten(2)) + tokens
        return out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)

    def one(x):
        x = convs[id(enc.conv_in)](x)
        for block in enc.down_blocks:
            for r in block.resnets:
                x = resnet(r, x)
            for down in block.downsamplers or []:
                x = convs[id(down.conv)](x)
                if x is None:
                    return None
        x = resnet(enc.mid_block.resnets[0], x)
        for attn, r in zip(enc.mid_block.attentions, enc.mid_block.resnets[1:]):
            x = resnet(r, attention(attn, x))
        return vae.quant_conv(convs[id(enc.conv_out)](x, enc.conv_norm_out))

    outs, start = [], 0
    with torch.no_grad():
        while start < pixels.shape[2]:
            stop = start + chunk + (1 if start == 0 else 0)
            out = one(pixels[:, :, start:stop])
            start = stop
            if out is not None:
                outs.append(out)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(("chunk", "size"), [(4, (32, 48)), (8, (33, 47)), (12, (24, 40)), (16, (17, 23))])
def test_fast_encoder_equals_previous_maths(chunk, size, channels_last):
    vae = _tiny_vae()
    x = torch.rand(1, 3, 17, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = _reference_encode(vae, x, chunk)
    ours = CausalChunkEncoder(vae, chunk_frames=chunk, channels_last=channels_last).encode(x)
    assert ours.shape == ref.shape and ours.is_contiguous()
    assert (ours - ref).abs().max() < 5e-6 * ref.abs().max()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert vae.encoder.conv_in.conv.weight.is_contiguous(memory_format=fmt)


def test_fast_encoder_batch_of_two_matches_one_by_one():
    vae = _tiny_vae()
    x = torch.rand(2, 3, 9, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    enc = CausalChunkEncoder(vae, chunk_frames=4)
    both = enc.encode(x)
    assert torch.allclose(both, torch.cat([enc.encode(x[:1]), enc.encode(x[1:])]), atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.channels_last_3d, torch.contiguous_format])
@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 2, 2)])
def test_streamed_conv_with_norm_equals_padded_concat(memory_format, stride):
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoCausalConv3d

    torch.manual_seed(0)
    conv = HunyuanVideoCausalConv3d(8, 6, 3, stride)
    norm = torch.nn.GroupNorm(2, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 14, 9, 13) * 3 + 1
    ours, ref, start = _StreamConv(conv, memory_format=memory_format), _RefConv(conv), 0
    for n in (5, 1, 4, 4):
        a, b = ours(x[:, :, start:start + n], norm), ref(x[:, :, start:start + n], norm)
        start += n
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_group_norm_fp32_stats_in_half(offset):
    """fp16 input, large mean: within one fp16 ulp of the exact GroupNorm, like F.group_norm with fp32 math."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 16, 5, 9, 11, generator=g) * 2 + offset).half()
    x = x.contiguous(memory_format=torch.channels_last_3d)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    exact = F.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6)
    ours = group_norm(x, norm.half())
    assert ours.dtype == torch.float16 and ours.is_contiguous(memory_format=torch.channels_last_3d)
    assert bool(((ours.double() - exact).abs() <= exact.abs() * 2**-10 + 1e-3).all())


@pytest.mark.parametrize("slice_frames", [3, 8, 32])
def test_whole_clip_encode_equals_untiled_diffusers(slice_frames):
    """Whole-clip GroupNorm/attention with the convolutions in slices is diffusers' encode without any tiling."""
    vae = _tiny_vae()
    vae.use_framewise_encoding = False
    x = torch.rand(1, 3, 21, 24, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = vae._encode(x)
    whole = CausalChunkEncoder(vae).encode_whole_clip(x, slice_frames=slice_frames)
    assert whole.shape == ref.shape and (whole - ref).abs().max() < 5e-6 * ref.abs().max()


def test_fused_norm_silu_matches_group_norm():
    """The function compile=True compiles, run eagerly: per-channel Welford combined per group is GroupNorm."""
    from k5model.encoders.causal_encode import _group_norm_silu_fused

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 16, 5, 9, 11, generator=g) * 2 + 30).contiguous(memory_format=torch.channels_last_3d)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
        buf = torch.zeros(2, 16, 7, 11, 13).contiguous(memory_format=torch.channels_last_3d)
        _group_norm_silu_fused(x, norm.weight, norm.bias, 4, 1e-6, buf[:, :, 2:, 1:10, 1:12])
    exact = F.silu(F.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6))
    assert (buf[:, :, 2:, 1:10, 1:12].double() - exact).abs().max() < 1e-5
    assert buf[:, :, :2].abs().max() == 0 and buf[:, :, 2:, 0].abs().max() == 0  # nothing outside the view


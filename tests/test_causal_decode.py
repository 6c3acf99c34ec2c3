"""The chunked causal VAE decoder (k5model.encoders.causal_encode.CausalChunkDecoder) against diffusers' decoder on a
tiny HunyuanVideo VAE, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKLHunyuanVideo  # noqa: E402

from k5model.encoders.causal_encode import CausalChunkDecoder, set_decoder_memory_format, upsample_nearest  # noqa: E402
from k5model.encoders.vae import VideoVAE  # noqa: E402


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4).eval()


def whole(vae, z):
    """diffusers' decoder over the whole clip: no temporal tiles (what the chunks approximate)."""
    with torch.no_grad():
        return vae.decoder(vae.post_quant_conv(z))


@pytest.fixture(autouse=True)
def contiguous_weights(vae):
    yield
    set_decoder_memory_format(vae, torch.contiguous_format)


def test_upsample_matches_diffusers_resampling():
    from torch.nn import functional as F

    x = torch.randn(1, 3, 4, 5, 6)
    ref = torch.cat([F.interpolate(x[:, :, 0], scale_factor=(2, 2), mode="nearest")[:, :, None],
                     F.interpolate(x[:, :, 1:], scale_factor=(2, 2, 2), mode="nearest")], 2)
    got = upsample_nearest(x, (2, 2, 2), starts_clip=True, memory_format=torch.channels_last_3d)
    assert torch.equal(got, ref)
    # a later chunk has no clip-start frame: every frame repeats in time
    later = upsample_nearest(x, (2, 2, 2), starts_clip=False, memory_format=torch.contiguous_format)
    assert torch.equal(later, F.interpolate(x, scale_factor=(2, 2, 2), mode="nearest"))


def test_one_chunk_and_the_sliced_whole_clip_decode_equal_diffusers_decoder(vae):
    z = torch.randn(1, 16, 6, 8, 12)
    ref = whole(vae, z)
    dec = CausalChunkDecoder(vae, chunk_latent_frames=16)
    assert (dec.decode(z) - ref).abs().max() < 1e-4
    assert (dec.decode_whole_clip(z, slice_frames=4) - ref).abs().max() < 1e-4  # the conv slices carry exact state


def test_chunks_carry_conv_state_first_chunk_exact_and_deviation_below_diffusers_tiles(vae):
    torch.manual_seed(1)
    z = torch.randn(1, 16, 9, 8, 12)
    ref = whole(vae, z)
    out = CausalChunkDecoder(vae, chunk_latent_frames=2).decode(z)
    assert out.shape == ref.shape == (1, 3, 33, 64, 96)
    # causal: the first chunk (latent frames 0..2 -> pixel frames 0..8) sees only its own frames, so it is exact
    assert (out[:, :, :9] - whole(vae, z[:, :, :3])).abs().max() < 1e-4
    # later chunks differ from the whole clip only by per-chunk GroupNorm statistics and attention
    ours_dev = (out - ref).abs().max().item()
    set_decoder_memory_format(vae, torch.contiguous_format)
    with torch.no_grad():
        tiled_dev = (vae.decode(z).sample - ref).abs().max().item()  # diffusers' overlapping temporal tiles
    assert 0 < ours_dev < tiled_dev


def test_video_vae_uses_chunked_decoding_and_switches_back(vae):
    wrapped = VideoVAE(vae)
    latents = torch.randn(1, 3, 8, 12, 16)
    with torch.no_grad():
        plain = wrapped.decode(latents)
    chunked = wrapped.use_chunked_decoding(chunk_latent_frames=8).decode(latents)
    assert vae.decoder.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert (chunked - plain).abs().max() < 1e-4  # 3 latent frames: one chunk, and diffusers does not tile them
    wrapped.use_diffusers_decoding()
    assert wrapped.chunked_decoder is None and vae.decoder.conv_in.conv.weight.is_contiguous()


def test_rejects_bad_latents_and_chunk(vae):
    with pytest.raises(ValueError, match="chunk_latent_frames"):
        CausalChunkDecoder(vae, chunk_latent_frames=0)
    with pytest.raises(ValueError, match="unscaled latents"):
        CausalChunkDecoder(vae).decode(torch.randn(1, 4, 3, 8, 8))


def test_from_pretrained_decodes_chunked_on_request_and_by_default_only_on_cuda(tiny_t2v_dir):
    assert VideoVAE.from_pretrained(tiny_t2v_dir).chunked_decoder is None  # CPU: diffusers' decode
    chunked = VideoVAE.from_pretrained(tiny_t2v_dir, chunked_decoding=True)
    assert isinstance(chunked.chunked_decoder, CausalChunkDecoder)

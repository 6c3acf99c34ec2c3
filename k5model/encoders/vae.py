"""VAEs of Kandinsky 5.0 behind one channels-last interface.

Video: HunyuanVideo VAE (8x spatial, 4x temporal, scaling 0.476986). Image: FLUX.1-dev VAE (8x spatial), of which the
official code applies only the scaling factor, never the shift factor. Latents leave ``encode`` already multiplied by
the scaling factor and laid out ``(B, T, h, w, C)`` like the transformer expects; ``decode`` undoes both.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _vae_dir(path: str | os.PathLike, subfolder: str | None) -> Path:
    root = Path(path)
    if subfolder is not None:
        return root / subfolder
    # A pipeline folder: use its vae/ component.
    if not (root / "config.json").exists() and (root / "vae").is_dir():
        return root / "vae"
    return root


class _VAEBase:
    def __init__(self, vae: torch.nn.Module):
        self.vae = vae.eval().requires_grad_(False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.vae.to(device=device, dtype=dtype)
        return self

    def _latents(self, dist, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        # The mean (mode) makes encoding deterministic; sampling matches diffusers' I2V pipeline.
        return dist.sample(generator=generator) if sample else dist.mode()


class VideoVAE(_VAEBase):
    """HunyuanVideo VAE: pixels (B, 3, F, H, W) with F = 4k+1 <-> latents (B, (F-1)//4+1, H/8, W/8, 16)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__(vae)
        self.chunked = None  # a CausalChunkEncoder once use_chunked_encoding() was called
        self.chunked_decoder = None  # a CausalChunkDecoder once use_chunked_decoding() was called

    def use_chunked_encoding(self, chunk_frames: int = 16, *, compile: bool = False,
                             channels_last: bool = True) -> VideoVAE:
        """Encode in causal temporal chunks with carried conv state instead of diffusers' overlapping tiles
        (see k5model.encoders.causal_encode): every frame is encoded once, memory stays bounded by the chunk."""
        from k5model.encoders.causal_encode import CausalChunkEncoder

        c = self.chunked
        if c is None or (c.chunk, c.compile, c.channels_last) != (chunk_frames, compile, channels_last):
            self.chunked = CausalChunkEncoder(self.vae, chunk_frames=chunk_frames, compile=compile,
                                              channels_last=channels_last)
        return self

    def use_diffusers_encoding(self) -> VideoVAE:
        """Back to diffusers' own encode (its tiling attributes apply); the encoder's weights contiguous again."""
        if self.chunked is not None:
            from k5model.encoders.causal_encode import set_encoder_memory_format

            self.chunked = None
            set_encoder_memory_format(self.vae, torch.contiguous_format)
        return self

    def use_chunked_decoding(self, chunk_latent_frames: int = 4, *, channels_last: bool = True) -> VideoVAE:
        """Decode in causal temporal chunks with carried conv state instead of diffusers' overlapping, blended tiles
        (see k5model.encoders.causal_encode.CausalChunkDecoder); memory stays bounded by the chunk."""
        from k5model.encoders.causal_encode import CausalChunkDecoder

        c = self.chunked_decoder
        if c is None or (c.chunk, c.channels_last) != (chunk_latent_frames, channels_last):
            self.chunked_decoder = CausalChunkDecoder(self.vae, chunk_latent_frames=chunk_latent_frames,
                                                      channels_last=channels_last)
        return self

    def use_diffusers_decoding(self) -> VideoVAE:
        """Back to diffusers' own decode (its tiling attributes apply); the decoder's weights contiguous again."""
        if self.chunked_decoder is not None:
            from k5model.encoders.causal_encode import set_decoder_memory_format

            self.chunked_decoder = None
            set_decoder_memory_format(self.vae, torch.contiguous_format)
        return self

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tiling: bool = True,
        chunked_decoding: bool | None = None,
    ) -> VideoVAE:
        """Load ``AutoencoderKLHunyuanVideo`` from a local VAE folder or a pipeline folder (``vae/``).

        The official code runs it in fp16 with tiling; tiling only kicks in above 256 px, so small inputs are untiled.
        ``chunked_decoding`` (default: on for CUDA) decodes with ``CausalChunkDecoder``: 3× faster than diffusers'
        default decode at 5 s 512×768 and closer to the whole-clip decode (docs/benchmarks.md, issue 19).
        """
        from diffusers import AutoencoderKLHunyuanVideo

        vae = AutoencoderKLHunyuanVideo.from_pretrained(_vae_dir(path, subfolder), torch_dtype=dtype)
        if tiling:
            vae.enable_tiling()
        video = cls(vae.to(device))
        if chunked_decoding if chunked_decoding is not None else torch.device(device).type == "cuda":
            video.use_chunked_decoding()
        return video

    @property
    def temporal_compression(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    @property
    def spatial_compression(self) -> int:
        return int(self.vae.config.spatial_compression_ratio)

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_compression + 1

    @torch.no_grad()
    def encode(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, F, H, W) or a single frame (B, 3, H, W) -> scaled latents (B, T, h, w, C)."""
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(2)  # an image is a 1-frame video (I2V conditioning)
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels (B, 3, F, H, W), got {tuple(pixels.shape)}")
        _, _, f, h, w = pixels.shape
        if (f - 1) % self.temporal_compression:
            raise ValueError(f"frame count must be {self.temporal_compression}k+1, got {f}")
        if h % self.spatial_compression or w % self.spatial_compression:
            raise ValueError(f"height and width must be multiples of {self.spatial_compression}, got {h}x{w}")
        if self.chunked is not None:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            dist = DiagonalGaussianDistribution(self.chunked.encode(pixels.to(self.device, self.dtype)))
        else:
            dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = self._latents(dist, sample, generator) * self.scaling_factor
        return z.permute(0, 2, 3, 4, 1).contiguous()  # (B, C, T, h, w) -> channels-last

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, T, h, w, C) -> pixels (B, 3, 4(T-1)+1, 8h, 8w) clamped to [-1, 1]."""
        if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"expected latents (B, T, h, w, {self.latent_channels}), got {tuple(latents.shape)}")
        z = latents.permute(0, 4, 1, 2, 3).to(self.device, self.dtype) / self.scaling_factor
        if self.chunked_decoder is not None:
            return self.chunked_decoder.decode(z).clamp_(-1, 1)
        return self.vae.decode(z).sample.clamp(-1, 1)


class ImageVAE(_VAEBase):
    """FLUX.1-dev VAE: pixels (B, 3, H, W) <-> latents (B, 1, H/8, W/8, 16); scaling only, no shift (official)."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tiling: bool = False,
    ) -> ImageVAE:
        """Load ``AutoencoderKL`` from a local VAE folder or a pipeline folder (``vae/``)."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(_vae_dir(path, subfolder), torch_dtype=dtype)
        if tiling:
            vae.enable_tiling()
        return cls(vae.to(device))

    @property
    def temporal_compression(self) -> int:
        return 1

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) (or (B, 3, 1, H, W)) -> scaled latents (B, 1, h, w, C)."""
        if pixels.ndim == 5:
            if pixels.shape[2] != 1:
                raise ValueError(f"ImageVAE encodes single frames, got {pixels.shape[2]} frames")
            pixels = pixels[:, :, 0]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels (B, 3, H, W), got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h % self.spatial_compression or w % self.spatial_compression:
            raise ValueError(f"height and width must be multiples of {self.spatial_compression}, got {h}x{w}")
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = self._latents(dist, sample, generator) * self.scaling_factor  # no shift_factor, as in the official code
        return z.permute(0, 2, 3, 1).unsqueeze(1).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 1, h, w, C) or (B, h, w, C) -> pixels (B, 3, 8h, 8w) clamped to [-1, 1]."""
        return self.decode_with_grad(latents)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` inside autograd: DRaFT back-propagates the reward through the decoder to the latents."""
        if latents.ndim == 5:
            if latents.shape[1] != 1:
                raise ValueError(f"ImageVAE decodes single frames, got T={latents.shape[1]}")
            latents = latents[:, 0]
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"expected latents (B, 1, h, w, {self.latent_channels}), got {tuple(latents.shape)}")
        z = latents.permute(0, 3, 1, 2).to(self.device, self.dtype) / self.scaling_factor
        return self.vae.decode(z).sample.clamp(-1, 1)

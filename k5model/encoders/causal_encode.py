"""Chunked causal encoding with the HunyuanVideo VAE encoder: no temporal overlap, no blending, bounded memory.

diffusers encodes a long clip in overlapping 17-frame tiles (stride 12, the overlap blended), so about 40% of the
frames are encoded twice, and with ``enable_tiling()`` also in overlapping 256-px spatial tiles (about 2× more).
Every convolution of this encoder is causal in time, though: an output frame depends on the current and earlier
input frames only. So we run the encoder over consecutive chunks of frames and give each causal convolution the
last input frames of the previous chunk (its "cache") instead of re-encoding an overlap. The convolutions are then
exact; what still depends on the chunking is what diffusers' tiles also see only per tile: GroupNorm statistics and
the mid-block attention, computed per chunk (the attention frame-causal inside the chunk, as in diffusers).

We walk diffusers' own modules and reuse their weights, so any ``AutoencoderKLHunyuanVideo`` checkpoint works.
Optional: ``torch.compile`` of the norm → SiLU → pad stages, channels-last-3d tensors and cuDNN autotuning.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def _prep(x: torch.Tensor, cache: torch.Tensor | None, front: int, spatial: tuple[int, ...], mode: str,
          norm: tuple | None) -> torch.Tensor:
    """A causal conv's input: [GroupNorm → SiLU →] spatial pad, after the cached frames of the previous chunk (or the
    first frame repeated ``front`` times). Compiled, this is one fused pass writing the conv's input once."""
    if norm is not None:
        groups, weight, bias, eps = norm
        x = F.silu(F.group_norm(x, groups, weight, bias, eps))
    if any(spatial):
        x = F.pad(x, (*spatial, 0, 0), mode=mode)
    if cache is not None:
        return torch.cat([cache, x], dim=2)
    return torch.cat([x[:, :, :1]] * front + [x], dim=2) if front else x


class _StreamConv:
    """One causal Conv3d applied chunk by chunk: keeps the (padded) input frames the next outputs still need."""

    def __init__(self, causal_conv: nn.Module, prep):
        self.conv: nn.Conv3d = causal_conv.conv
        pw0, pw1, ph0, ph1, pt0, pt1 = causal_conv.time_causal_padding
        if pt1 != 0:
            raise ValueError(f"not a causal convolution: it pads {pt1} frames at the end")
        self.front, self.spatial, self.mode = pt0, (pw0, pw1, ph0, ph1), causal_conv.pad_mode
        self.kt, self.st = self.conv.kernel_size[0], self.conv.stride[0]
        self.prep = prep
        self.cache: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, norm: nn.GroupNorm | None = None) -> torch.Tensor | None:
        gn = None if norm is None else (norm.num_groups, norm.weight, norm.bias, norm.eps)
        buf = self.prep(x, self.cache, self.front, self.spatial, self.mode, gn)
        n = (buf.shape[2] - self.kt) // self.st + 1 if buf.shape[2] >= self.kt else 0
        # a copy: a view would keep the whole chunk-sized buffer alive until the next chunk
        self.cache = buf[:, :, n * self.st:].clone()
        if n == 0:
            return None
        return self.conv(buf[:, :, : (n - 1) * self.st + self.kt])


class CausalChunkEncoder:
    """``encode(pixels)`` of an ``AutoencoderKLHunyuanVideo`` in temporal chunks; returns the posterior moments."""

    def __init__(self, vae: nn.Module, *, chunk_frames: int = 16, compile: bool = False,
                 channels_last: bool = False, cudnn_benchmark: bool = True):
        if chunk_frames % vae.config.temporal_compression_ratio:
            raise ValueError(f"chunk_frames must be a multiple of {vae.config.temporal_compression_ratio}, "
                             f"got {chunk_frames}")
        self.vae, self.chunk = vae, chunk_frames
        self.channels_last, self.cudnn_benchmark = channels_last, cudnn_benchmark
        # dynamic shapes: one compiled graph serves every level and chunk length instead of ~30 static variants
        self.prep = torch.compile(_prep, dynamic=True) if compile else _prep
        if channels_last:
            vae.encoder.to(memory_format=torch.channels_last_3d)
            vae.quant_conv.to(memory_format=torch.channels_last_3d)

    # -- building blocks ------------------------------------------------------------------------------------------
    def _resnet(self, block: nn.Module, x: torch.Tensor, convs: dict) -> torch.Tensor:
        h = convs[id(block.conv1)](x, block.norm1)
        h = convs[id(block.conv2)](h, block.norm2)
        res = x if block.conv_shortcut is None else convs[id(block.conv_shortcut)](x)
        return h + res

    def _attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """diffusers' mid-block attention over this chunk's latent frames, frame-causal, without a dense mask:
        the queries of frame f attend to frames 0..f, so each frame is one unmasked attention call."""
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
        normed = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        heads = attn.heads
        q, k, v = (lin(normed).unflatten(-1, (heads, -1)).transpose(1, 2)
                   for lin in (attn.to_q, attn.to_k, attn.to_v))
        hw = h * w
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, f * hw:(f + 1) * hw], k[:, :, : (f + 1) * hw],
                                                        v[:, :, : (f + 1) * hw]) for f in range(t)], dim=2)
        out = attn.to_out[0](out.transpose(1, 2).flatten(2))
        out = (out + tokens) / attn.rescale_output_factor if attn.residual_connection else out
        return out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)

    def _chunk(self, x: torch.Tensor, convs: dict) -> torch.Tensor | None:
        enc = self.vae.encoder
        x = convs[id(enc.conv_in)](x)
        for block in enc.down_blocks:
            for resnet in block.resnets:
                x = self._resnet(resnet, x, convs)
            for down in block.downsamplers or []:
                x = convs[id(down.conv)](x)
                if x is None:  # a strided conv may need the next chunk's frames before it can emit one
                    return None
        mid = enc.mid_block
        x = self._resnet(mid.resnets[0], x, convs)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                x = self._attention(attn, x)
            x = self._resnet(resnet, x, convs)
        x = convs[id(enc.conv_out)](x, enc.conv_norm_out)
        return self.vae.quant_conv(x)

    # -- public -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, 4k+1, H, W) -> posterior moments (B, 2C, k+1, H/8, W/8) (mean first, then log-variance).

        The first chunk is ``chunk_frames + 1`` frames (the causal first frame plus a whole number of temporal
        groups), then ``chunk_frames`` at a time; each chunk's output goes straight into the result."""
        if pixels.ndim != 5:
            raise ValueError(f"expected pixels (B, 3, F, H, W), got {tuple(pixels.shape)}")
        convs = {id(m): _StreamConv(m, self.prep) for m in self.vae.encoder.modules() if hasattr(m, "time_causal_padding")}
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last_3d)
        bench = (torch.backends.cudnn.flags(enabled=True, benchmark=True) if self.cudnn_benchmark and pixels.is_cuda
                 else contextlib.nullcontext())
        outs, start = [], 0
        with bench:
            while start < pixels.shape[2]:
                stop = start + self.chunk + (1 if start == 0 else 0)
                out = self._chunk(pixels[:, :, start:stop], convs)
                if out is not None:
                    outs.append(out)
                start = stop
        return torch.cat(outs, dim=2)

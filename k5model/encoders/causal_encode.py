"""Chunked causal encoding with the HunyuanVideo VAE encoder: no temporal overlap, no blending, bounded memory.

diffusers encodes a long clip in overlapping 17-frame tiles (stride 12, the overlap blended), so about 40% of the
frames are encoded twice, and with ``enable_tiling()`` also in overlapping 256-px spatial tiles (about 2× more).
Every convolution of this encoder is causal in time, though: an output frame depends on the current and earlier
input frames only. So we run the encoder over consecutive chunks of frames and give each causal convolution the
last input frames of the previous chunk (its "cache") instead of re-encoding an overlap. The convolutions are then
exact; what still depends on the chunking is what diffusers' tiles also see only per tile: GroupNorm statistics and
the mid-block attention, computed per chunk (the attention frame-causal inside the chunk, as in diffusers).

We walk diffusers' own modules and reuse their weights, so any ``AutoencoderKLHunyuanVideo`` checkpoint works.

Speed (the convolutions are cuDNN's; everything around them is memory traffic, so we keep it to a few passes):

* activations stay channels-last-3d (memory N,T,H,W,C) with channels-last conv weights, so cuDNN runs its NHWC
  kernels without layout transposes;
* GroupNorm statistics come from per-channel reductions (fp16: sum and sum of squares with fp32 accumulators) —
  column reductions over the whole chunk that fill the GPU, unlike ``F.group_norm``'s one thread block per
  (sample, group) — then scale and shift per channel in one pass and SiLU in place;
* each causal conv's input buffer (cached frames + padded chunk) is allocated once and written in place: the
  normalised chunk goes straight into its interior, the replicate borders are a few slice copies, no ``F.pad``
  and no ``torch.cat``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from k5model.torch_patches import recompile_limits


def group_norm_affine(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of ``x`` (N, C, *) as a per-channel affine map: (scale, shift), each (N, C), in fp32 or wider."""
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    return _affine_map(x, norm.num_groups, weight, bias, norm.eps)


def _affine_map(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics per channel first (reduce every dim but N, C: in channels-last memory a contiguous column reduction
    that fills the GPU, unlike ``F.group_norm``'s one thread block per (sample, group)), then per group. fp16/bf16:
    sum and sum of squares, each read once and accumulated in fp32 (on CUDA without an fp32 copy); fp32/fp64:
    Welford per channel, combined exactly (equal counts: mean of the channel means; mean of the channel variances
    plus variance of the channel means). Keeping scale and shift in fp32 means a large group mean loses no
    precision when x is fp16."""
    n, c = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    dims = tuple(range(2, x.ndim))
    if x.dtype == acc:
        var_c, mean_c = torch.var_mean(x, dims, correction=0)
        mean_c, var_c = mean_c.view(n, groups, -1), var_c.view(n, groups, -1)
        mean = mean_c.mean(-1, keepdim=True)
        var = var_c.mean(-1, keepdim=True) + (mean_c - mean).square().mean(-1, keepdim=True)
    else:
        count = x[0, 0].numel() * (c // groups)
        mean = x.sum(dims, dtype=acc).view(n, groups, -1).sum(-1, keepdim=True) / count
        sq = torch.linalg.vector_norm(x, 2, dims, dtype=acc).square().view(n, groups, -1).sum(-1, keepdim=True)
        var = (sq / count - mean.square()).clamp_min(0)
    scale = (var + eps).rsqrt().expand(n, groups, c // groups)
    if weight is not None:
        scale = scale * weight.to(acc).view(groups, -1)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(acc).view(groups, -1)
    return scale.reshape(n, c), shift.reshape(n, c)


Norm = nn.GroupNorm | tuple[torch.Tensor, torch.Tensor]  # a GroupNorm, or its affine map already computed


@torch.no_grad()
def group_norm_into(x: torch.Tensor, norm: Norm, out: torch.Tensor) -> torch.Tensor:
    """``out[...] = norm(x)``, ``out`` of any strides (e.g. the interior of a padded buffer)."""
    scale, shift = group_norm_affine(x, norm) if isinstance(norm, nn.GroupNorm) else norm
    shape = x.shape[:2] + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape), out=out)


def group_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    return group_norm_into(x, norm, torch.empty_like(x))


def _group_norm_silu_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                           out: torch.Tensor) -> None:
    """GroupNorm → SiLU written into ``out``; meant for ``torch.compile``: fp32 statistics (Welford per channel,
    combined per group), then one pass x·scale + shift → SiLU. Tensors, not the module, are the arguments, so one
    compiled graph serves every GroupNorm of the encoder."""
    xf = x.float()
    scale, shift = _affine_map(xf, groups, weight, bias, eps)
    shape = x.shape[:2] + (1,) * (x.ndim - 2)
    out.copy_(F.silu(xf * scale.view(shape) + shift.view(shape)))


class _StreamConv:
    """One causal Conv3d applied chunk by chunk: keeps the (padded) input frames the next outputs still need.

    ``fused``: an optional compiled GroupNorm → SiLU writer (``_group_norm_silu_fused``); without it the norm is
    ``group_norm_into`` and the SiLU one in-place pass over the buffer's new frames."""

    def __init__(self, causal_conv: nn.Module, *, memory_format: torch.memory_format = torch.channels_last_3d,
                 fused=None):
        self.conv: nn.Conv3d = causal_conv.conv
        pw0, pw1, ph0, ph1, pt0, pt1 = causal_conv.time_causal_padding
        if pt1 != 0:
            raise ValueError(f"not a causal convolution: it pads {pt1} frames at the end")
        if causal_conv.pad_mode != "replicate" and (pt0 or pw0 or pw1 or ph0 or ph1):
            raise ValueError(f"only replicate padding is supported, got {causal_conv.pad_mode!r}")
        self.front, self.pad = pt0, (ph0, ph1, pw0, pw1)
        self.kt, self.st = self.conv.kernel_size[0], self.conv.stride[0]
        self.memory_format, self.fused = memory_format, fused
        self.cache: torch.Tensor | None = None

    def fill(self, x: torch.Tensor, norm: Norm | None = None) -> torch.Tensor:
        """The conv's input for this chunk: cached frames (or the first frame repeated), then [SiLU(norm(x))],
        replicate-padded in H and W."""
        n, c, t, h, w = x.shape
        ph0, ph1, pw0, pw1 = self.pad
        k = self.front if self.cache is None else self.cache.shape[2]
        buf = torch.empty((n, c, k + t, h + ph0 + ph1, w + pw0 + pw1), dtype=x.dtype, device=x.device,
                          memory_format=self.memory_format)
        inner = buf[:, :, k:, ph0:ph0 + h, pw0:pw0 + w]
        act_later = False
        if norm is None:
            inner.copy_(x)
        elif self.fused is not None and isinstance(norm, nn.GroupNorm) and norm.affine:
            self.fused(x, norm.weight, norm.bias, norm.num_groups, norm.eps, inner)
        else:
            group_norm_into(x, norm, inner)
            act_later = True
        new = buf[:, :, k:]
        # replicate borders: columns of the interior rows first, then whole rows, so corners copy the corner pixel
        if pw0:
            new[..., ph0:ph0 + h, :pw0].copy_(new[..., ph0:ph0 + h, pw0:pw0 + 1].expand(-1, -1, -1, -1, pw0))
        if pw1:
            edge = new[..., ph0:ph0 + h, pw0 + w - 1:pw0 + w]
            new[..., ph0:ph0 + h, pw0 + w:].copy_(edge.expand(-1, -1, -1, -1, pw1))
        if ph0:
            new[:, :, :, :ph0].copy_(new[:, :, :, ph0:ph0 + 1].expand(-1, -1, -1, ph0, -1))
        if ph1:
            new[:, :, :, ph0 + h:].copy_(new[:, :, :, ph0 + h - 1:ph0 + h].expand(-1, -1, -1, ph1, -1))
        if act_later:  # SiLU commutes with replication: one pass over the new frames, borders included
            F.silu(new, inplace=True)
        if self.cache is not None:
            buf[:, :, :k].copy_(self.cache)
        elif k:  # causal start: the first frame repeated in front
            buf[:, :, :k].copy_(buf[:, :, k:k + 1].expand(-1, -1, k, -1, -1))
        return buf

    def run(self, buf: torch.Tensor) -> torch.Tensor | None:
        """Convolve a filled buffer and keep its trailing frames as the next chunk's cache (None: too few frames)."""
        n = (buf.shape[2] - self.kt) // self.st + 1 if buf.shape[2] >= self.kt else 0
        # a copy: a view would keep the whole chunk-sized buffer alive until the next chunk
        self.cache = buf[:, :, n * self.st:].clone()
        if n == 0:
            return None
        return self.conv(buf[:, :, : (n - 1) * self.st + self.kt])

    def __call__(self, x: torch.Tensor, norm: Norm | None = None) -> torch.Tensor | None:
        if norm is None and self.kt == 1 and not any(self.pad):  # a 1×1×1 conv (residual shortcut): no state
            return self.conv(x)
        return self.run(self.fill(x, norm))


class _WholeConv:
    """A causal conv over the whole clip, GroupNorm statistics of the whole clip, convolved in temporal slices with
    carried state (exact): cuDNN takes no input of 2^31 elements or more per sample, a 121×512×768 clip has 6·10^9
    at the first level. Same ``fill``/``run`` interface as ``_StreamConv``."""

    def __init__(self, causal_conv: nn.Module, *, memory_format: torch.memory_format, slice_frames: int):
        self.stream = _StreamConv(causal_conv, memory_format=memory_format)
        self.slice = slice_frames

    def fill(self, x: torch.Tensor, norm: nn.GroupNorm | None = None) -> tuple:
        return x, None if norm is None else group_norm_affine(x, norm)

    def run(self, pending: tuple) -> torch.Tensor:
        x, norm = pending
        s = self.stream
        s.cache, out, pos = None, None, 0
        for start in range(0, x.shape[2], self.slice):
            y = s(x[:, :, start:start + self.slice], norm)
            if y is None:
                continue
            if out is None:  # written in place: a cat of the slices would double the peak
                t_out = (x.shape[2] + s.front - s.kt) // s.st + 1
                out = torch.empty(y.shape[:2] + (t_out,) + y.shape[3:], dtype=y.dtype, device=y.device,
                                  memory_format=s.memory_format)
            out[:, :, pos:pos + y.shape[2]] = y
            pos += y.shape[2]
        return out

    def __call__(self, x: torch.Tensor, norm: nn.GroupNorm | None = None) -> torch.Tensor:
        return self.run(self.fill(x, norm))


def set_encoder_memory_format(vae: nn.Module, memory_format: torch.memory_format) -> None:
    """Convert the encoder's weights (and the quant conv's) in place: channels-last-3d for the chunked encoder,
    contiguous again for diffusers' own encode."""
    vae.encoder.to(memory_format=memory_format)
    vae.quant_conv.to(memory_format=memory_format)


class _CausalChunkRunner:
    """What the chunked encoder and decoder share: the ResNet block and mid-block attention on chunks, the settings
    a run enters (cuDNN autotuning, compile limits)."""

    compile: bool = False
    cudnn_benchmark: bool = True

    # -- building blocks ------------------------------------------------------------------------------------------
    def _resnet(self, block: nn.Module, x: torch.Tensor, convs: dict) -> torch.Tensor:
        h = convs[id(block.conv1)](x, block.norm1)
        conv2 = convs[id(block.conv2)]
        buf = conv2.fill(h, block.norm2)
        del h  # conv1's output is in buf now: free it before conv2 runs (peak = x + buf + output)
        h = conv2.run(buf)
        del buf
        res = x if block.conv_shortcut is None else convs[id(block.conv_shortcut)](x)
        return h.add_(res)

    def _attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """diffusers' mid-block attention over this chunk's latent frames, frame-causal, without a dense mask:
        the queries of frame f attend to frames 0..f, so each frame is one unmasked attention call."""
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)  # a view when x is channels-last
        normed = group_norm(x, attn.group_norm).permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
        heads = attn.heads
        q, k, v = (lin(normed).unflatten(-1, (heads, -1)).transpose(1, 2)
                   for lin in (attn.to_q, attn.to_k, attn.to_v))
        del normed
        hw = h * w
        out = torch.empty_like(q)
        for f in range(t):
            out[:, :, f * hw:(f + 1) * hw] = F.scaled_dot_product_attention(
                q[:, :, f * hw:(f + 1) * hw], k[:, :, : (f + 1) * hw], v[:, :, : (f + 1) * hw])
        out = attn.to_out[0](out.transpose(1, 2).flatten(2))
        if attn.residual_connection:
            out = out.add_(tokens)
        if attn.rescale_output_factor != 1:
            out = out.div_(attn.rescale_output_factor)
        return out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # channels-last in memory

    def _settings(self, pixels: torch.Tensor) -> contextlib.ExitStack:
        """cuDNN autotuning on GPU; with ``compile``, room for dynamo to keep every level and chunk length's graph."""
        stack = contextlib.ExitStack()
        if self.cudnn_benchmark and pixels.is_cuda:
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=True))
        if self.compile:
            stack.enter_context(recompile_limits(64, 1024))
        return stack


class CausalChunkEncoder(_CausalChunkRunner):
    """``encode(pixels)`` of an ``AutoencoderKLHunyuanVideo`` in temporal chunks; returns the posterior moments.

    ``channels_last`` (default): channels-last-3d activations and conv weights (the encoder's weights are converted
    in place; ``False`` converts them back to contiguous). ``compile``: ``torch.compile`` the GroupNorm → SiLU →
    buffer write (fp32 Welford statistics, one fused pointwise pass); the eager path is the default."""

    def __init__(self, vae: nn.Module, *, chunk_frames: int = 16, compile: bool = False,
                 channels_last: bool = True, cudnn_benchmark: bool = True):
        if chunk_frames % vae.config.temporal_compression_ratio:
            raise ValueError(f"chunk_frames must be a multiple of {vae.config.temporal_compression_ratio}, "
                             f"got {chunk_frames}")
        self.vae, self.chunk = vae, chunk_frames
        self.channels_last, self.cudnn_benchmark, self.compile = channels_last, cudnn_benchmark, compile
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        # static shapes would need ~30 variants (levels × chunk lengths × cache sizes); automatic dynamic needs few
        self.fused = torch.compile(_group_norm_silu_fused, fullgraph=True) if compile else None
        set_encoder_memory_format(vae, self.memory_format)

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
        convs = {id(m): _StreamConv(m, memory_format=self.memory_format, fused=self.fused)
                 for m in self.vae.encoder.modules() if hasattr(m, "time_causal_padding")}
        outs, start = [], 0
        with self._settings(pixels):
            while start < pixels.shape[2]:
                stop = start + self.chunk + (1 if start == 0 else 0)
                out = self._chunk(pixels[:, :, start:stop], convs)
                if out is not None:
                    outs.append(out)
                start = stop
        return torch.cat(outs, dim=2).contiguous()

    @torch.no_grad()
    def encode_whole_clip(self, pixels: torch.Tensor, slice_frames: int = 16) -> torch.Tensor:
        """The reference the chunks approximate: GroupNorm statistics and the mid-block attention over the whole
        clip (diffusers' encode without any tiling), the convolutions run in ``slice_frames`` slices (exact).
        Memory grows with the whole clip (docs/benchmarks.md gives it for 121×512×768 fp16)."""
        convs = {id(m): _WholeConv(m, memory_format=self.memory_format, slice_frames=slice_frames)
                 for m in self.vae.encoder.modules() if hasattr(m, "time_causal_padding")}
        with self._settings(pixels):
            return self._chunk(pixels, convs).contiguous()


def set_decoder_memory_format(vae: nn.Module, memory_format: torch.memory_format) -> None:
    """Convert the decoder's weights (and the post-quant conv's) in place, like ``set_encoder_memory_format``."""
    vae.decoder.to(memory_format=memory_format)
    vae.post_quant_conv.to(memory_format=memory_format)


def upsample_nearest(x: torch.Tensor, factor: tuple[int, int, int], *, starts_clip: bool,
                     memory_format: torch.memory_format) -> torch.Tensor:
    """diffusers' ``HunyuanVideoUpsampleCausal3D`` resampling (nearest, before its conv) written once into a new
    tensor of ``memory_format``: the clip's first frame is repeated in space only, every later frame also ``ft``
    times in time. ``starts_clip``: whether ``x`` begins with the clip's first frame (only the first chunk does)."""
    ft, fh, fw = factor
    n, c, t, h, w = x.shape
    first = 1 if starts_clip else 0
    out = torch.empty((n, c, first + (t - first) * ft, h * fh, w * fw), dtype=x.dtype, device=x.device,
                      memory_format=memory_format)

    def put(dst: torch.Tensor, src: torch.Tensor, rep_t: int) -> None:
        # split each output dim into (input index, repeat) and broadcast the input over the repeats: one pass
        view = dst.unflatten(4, (w, fw)).unflatten(3, (h, fh)).unflatten(2, (src.shape[2], rep_t))
        view.copy_(src[:, :, :, None, :, None, :, None].expand(view.shape))

    if first:
        put(out[:, :, :1], x[:, :, :1], 1)
    if t > first:
        put(out[:, :, first:], x[:, :, first:], ft)
    return out


class CausalChunkDecoder(_CausalChunkRunner):
    """``decode(z)`` of an ``AutoencoderKLHunyuanVideo`` in temporal chunks of latent frames, the decoder's
    counterpart of ``CausalChunkEncoder``: every causal conv carries its last input frames to the next chunk and the
    temporal upsamplers know whether a chunk starts the clip, so the convolutions and resampling are exact and no
    frame is decoded twice or blended (diffusers decodes overlapping 5-latent-frame tiles, treats each tile's first
    frame as a clip start, drops it and blends 4 frames). What stays per chunk: the GroupNorm statistics and the
    mid-block attention (frame-causal inside the chunk), as in diffusers' tiles.

    ``chunk_latent_frames``: latent frames per chunk after the first (which takes one more: the causal first frame).
    ``channels_last`` converts the decoder's weights in place (``set_decoder_memory_format`` converts them back)."""

    def __init__(self, vae: nn.Module, *, chunk_latent_frames: int = 4, channels_last: bool = True,
                 cudnn_benchmark: bool = True):
        if chunk_latent_frames < 1:
            raise ValueError(f"chunk_latent_frames must be >= 1, got {chunk_latent_frames}")
        self.vae, self.chunk = vae, chunk_latent_frames
        self.channels_last, self.cudnn_benchmark = channels_last, cudnn_benchmark
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        set_decoder_memory_format(vae, self.memory_format)

    def _chunk(self, z: torch.Tensor, convs: dict, starts_clip: bool) -> torch.Tensor:
        dec = self.vae.decoder
        x = self.vae.post_quant_conv(z.contiguous(memory_format=self.memory_format))
        x = convs[id(dec.conv_in)](x)
        mid = dec.mid_block
        x = self._resnet(mid.resnets[0], x, convs)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                x = self._attention(attn, x)
            x = self._resnet(resnet, x, convs)
        for block in dec.up_blocks:
            for resnet in block.resnets:
                x = self._resnet(resnet, x, convs)
            for up in block.upsamplers or []:
                x = upsample_nearest(x, tuple(int(f) for f in up.upsample_factor), starts_clip=starts_clip,
                                     memory_format=self.memory_format)
                x = convs[id(up.conv)](x)
        return convs[id(dec.conv_out)](x, dec.conv_norm_out)

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.vae.config.latent_channels:
            raise ValueError(f"expected unscaled latents (B, {self.vae.config.latent_channels}, T, h, w), "
                             f"got {tuple(z.shape)}")

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, T, h, w) -> pixels (B, 3, 4(T-1)+1, 8h, 8w), not clamped (diffusers' ``decode``).
        Each chunk's frames go straight into the preallocated result."""
        self._check(z)
        convs = {id(m): _StreamConv(m, memory_format=self.memory_format)
                 for m in self.vae.decoder.modules() if hasattr(m, "time_causal_padding")}
        tc, sc = self.vae.config.temporal_compression_ratio, self.vae.config.spatial_compression_ratio
        b, _, t, h, w = z.shape
        out, pos, start = None, 0, 0
        with self._settings(z):
            while start < t:
                stop = start + self.chunk + (1 if start == 0 else 0)
                y = self._chunk(z[:, :, start:stop], convs, starts_clip=start == 0)
                if out is None:
                    out = torch.empty((b, y.shape[1], (t - 1) * tc + 1, h * sc, w * sc), dtype=y.dtype,
                                      device=y.device)
                out[:, :, pos:pos + y.shape[2]] = y
                pos += y.shape[2]
                start = stop
        return out

    @torch.no_grad()
    def decode_whole_clip(self, z: torch.Tensor, slice_frames: int = 16) -> torch.Tensor:
        """The reference the chunks approximate: diffusers' decoder over the whole clip with no tiling (GroupNorm
        statistics and the mid-block attention over every frame), the convolutions run exactly in ``slice_frames``
        slices (cuDNN takes no single 121×512×768 input). Memory grows with the whole clip."""
        self._check(z)
        convs = {id(m): _WholeConv(m, memory_format=self.memory_format, slice_frames=slice_frames)
                 for m in self.vae.decoder.modules() if hasattr(m, "time_causal_padding")}
        with self._settings(z):
            return self._chunk(z, convs, starts_clip=True).contiguous()

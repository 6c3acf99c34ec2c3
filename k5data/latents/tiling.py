"""How the HunyuanVideo VAE tiles each supported video resolution (report §7.1): ``TilePlan``, the per-resolution
table ``VIDEO_TILING`` and ``tile_plan`` for any other size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TilePlan:
    """How the HunyuanVideo VAE tiles one resolution: ``tiles_h × tiles_w`` spatial tiles overlapping by
    ``overlap`` px (1×1 = the whole frame, no spatial seams) and temporal tiles of ``frames`` frames every
    ``frames_stride`` frames (``frames=None``: the whole clip at once). diffusers' ``enable_tiling()`` defaults are
    256-px tiles every 192 px and 16 frames every 12.

    ``chunk_frames`` instead encodes whole frames in causal chunks of that many frames with each causal conv's state
    carried across chunks (``k5model.encoders.causal_encode``): no overlap encoded twice, no blending, and closer to
    the whole-clip encode than diffusers' temporal tiles (which restart the causal context every tile)."""

    tiles_h: int = 1
    tiles_w: int = 1
    frames: int | None = 16
    frames_stride: int = 12
    overlap: int = 64
    chunk_frames: int | None = None

    def __post_init__(self) -> None:
        bad_frames = self.frames is not None and (self.frames % 4 or self.frames_stride % 4
                                                  or not 0 < self.frames_stride <= self.frames)
        if self.tiles_h < 1 or self.tiles_w < 1 or bad_frames or self.overlap % 8:
            raise ValueError(f"invalid tile plan {self}: tiles >= 1, frames/stride multiples of 4 with "
                             "0 < stride <= frames (or frames=None), overlap a multiple of 8")
        if self.chunk_frames is not None and (self.chunk_frames <= 0 or self.chunk_frames % 4
                                              or self.tiles_h != 1 or self.tiles_w != 1):
            raise ValueError(f"invalid tile plan {self}: chunk_frames must be a positive multiple of 4 and the "
                             "chunked encoder takes whole frames (tiles_h = tiles_w = 1)")

    def configure(self, video_vae: Any, height: int, width: int) -> None:
        """Set a ``k5model.encoders.vae.VideoVAE`` up for ``height × width`` inputs: chunked causal encoding, or
        diffusers' encode with this plan's tiles."""
        if self.chunk_frames is not None:
            video_vae.use_chunked_encoding(self.chunk_frames)
        else:
            video_vae.use_diffusers_encoding()
            self.apply(video_vae.vae, height, width)

    def apply(self, vae: torch.nn.Module, height: int, width: int) -> None:
        """Set a diffusers ``AutoencoderKLHunyuanVideo``'s tiling attributes for ``height × width`` inputs."""
        vae.use_framewise_encoding = self.frames is not None
        vae.tile_sample_min_num_frames = self.frames or 16
        vae.tile_sample_stride_num_frames = self.frames_stride
        vae.use_tiling = self.tiles_h > 1 or self.tiles_w > 1
        for side, n, axis in ((height, self.tiles_h, "height"), (width, self.tiles_w, "width")):
            stride = side if n == 1 else math.ceil(side / n / 8) * 8
            setattr(vae, f"tile_sample_stride_{axis}", stride)
            setattr(vae, f"tile_sample_min_{axis}", side if n == 1 else stride + self.overlap)


# Per supported video resolution (report §7.1: "fewer tiles means less quality loss"): no tiles where the whole clip
# fits, causal chunks of whole frames for the 512 class (nearest to the whole-clip encode), else the fewest spatial
# tiles; measured in docs/benchmarks.md, "Latent tiling per video resolution". Override per run with
# LatentConfig.tiling (e.g. smaller GPUs).
_LOW, _MID = TilePlan(frames=None), TilePlan(chunk_frames=16)
VIDEO_TILING: dict[str, TilePlan] = {
    "256x256": _LOW, "256x384": _LOW, "384x256": _LOW,
    "512x512": _MID, "512x768": _MID, "768x512": _MID,
    "1024x1024": TilePlan(2, 1), "1408x640": TilePlan(2, 1), "640x1408": TilePlan(1, 2),
    "1280x768": TilePlan(2, 1), "768x1280": TilePlan(1, 2), "1152x896": TilePlan(2, 1), "896x1152": TilePlan(1, 2),
}


def tile_plan(height: int, width: int, table: dict[str, TilePlan] | None = None) -> TilePlan:
    """The table's plan for ``height × width``; other sizes (e.g. demo-scaled): no tiles up to 256×384 px, else whole
    frames in 16-frame causal chunks up to 768 px per side, else tiles of at most 768 px per side with 16-frame
    temporal tiles."""
    plans = {**VIDEO_TILING, **(table or {})}
    if (key := f"{height}x{width}") in plans:
        return plans[key]
    if height * width <= 256 * 384:
        return _LOW
    if height <= 768 and width <= 768:
        return _MID
    return TilePlan(math.ceil(height / 768), math.ceil(width / 768))

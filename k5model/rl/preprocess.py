"""Qwen2.5-VL image preprocessing on torch tensors, so a reward's gradient reaches the generated pixels.

The Hugging Face processor (``Qwen2VLImageProcessor``) goes through PIL/numpy, which silently cuts the autograd graph.
This module repeats its three steps with differentiable torch ops:

1. resize to ``smart_resize`` of the processor (both sides a multiple of ``patch_size · merge_size``, pixel count within
   ``[min_pixels, max_pixels]``), bicubic with antialiasing — torch's antialiased bicubic uses PIL's kernel (a = -0.5);
   the processor additionally rounds the resized image to uint8 (we clip to [0, 1] as that does), so the two agree
   to about one grey level;
2. rescale to [0, 1] and normalise with the processor's mean/std;
3. patchify into the flattened layout the vision tower reads: rows ordered (gh/m, gw/m, m, m), each row
   (C, temporal_patch_size, patch, patch) with the single frame repeated ``temporal_patch_size`` times; plus
   ``grid_thw = (1, gh, gw)`` per image.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, kw_only=True)
class VisionPreprocessConfig:
    """The numbers of a Qwen2.5-VL image processor (``preprocessor_config.json``)."""

    patch_size: int = 14
    """Side of one vision patch in pixels."""
    merge_size: int = 2
    """Patches merged per side into one language-model token (the resize grid is patch_size · merge_size)."""
    temporal_patch_size: int = 2
    """Frames per patch; a still image is repeated this many times."""
    min_pixels: int = 56 * 56
    """Smallest resized pixel count (the processor's ``size.shortest_edge``)."""
    max_pixels: int = 28 * 28 * 1280
    """Largest resized pixel count (the processor's ``size.longest_edge``)."""
    image_mean: tuple[float, float, float] = field(default=OPENAI_CLIP_MEAN)
    """Per-channel mean subtracted after rescaling to [0, 1]."""
    image_std: tuple[float, float, float] = field(default=OPENAI_CLIP_STD)
    """Per-channel std divided by after subtracting the mean."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> VisionPreprocessConfig:
        """Read ``preprocessor_config.json`` of a model folder; a folder without one gets the Qwen2.5-VL defaults."""
        file = Path(path) / "preprocessor_config.json"
        if not file.exists():
            return cls()
        raw = json.loads(file.read_text())
        size = raw.get("size") or {}
        kw = {k: raw[k] for k in ("patch_size", "merge_size", "temporal_patch_size") if k in raw}
        min_px = raw.get("min_pixels", size.get("shortest_edge"))
        max_px = raw.get("max_pixels", size.get("longest_edge"))
        if min_px is not None:
            kw["min_pixels"] = int(min_px)
        if max_px is not None:
            kw["max_pixels"] = int(max_px)
        if "image_mean" in raw:
            kw["image_mean"] = tuple(float(v) for v in raw["image_mean"])
        if "image_std" in raw:
            kw["image_std"] = tuple(float(v) for v in raw["image_std"])
        return cls(**kw)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def resized_size(height: int, width: int, config: VisionPreprocessConfig) -> tuple[int, int]:
    """The processor's ``smart_resize``: sides rounded to the grid, the pixel count brought into range."""
    f = config.factor
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {height}x{width}: aspect ratio above 200 is not accepted by Qwen2.5-VL")
    h, w = round(height / f) * f, round(width / f) * f
    if h * w > config.max_pixels:
        beta = math.sqrt(height * width / config.max_pixels)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h * w < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h, w


def patchify(image: torch.Tensor, config: VisionPreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One normalised image (C, H, W), H and W multiples of the grid -> (gh·gw, C·tp·p·p) rows and grid (1, gh, gw)."""
    c, h, w = image.shape
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    if h % config.factor or w % config.factor:
        raise ValueError(f"image {h}x{w} is not a multiple of the vision grid {config.factor}; resize it first")
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(5).expand(*x.shape[:5], tp, p, p)
    return x.reshape(gh * gw, c * tp * p * p), torch.tensor([1, gh, gw], dtype=torch.long)


def preprocess_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    config: VisionPreprocessConfig,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) or a list of (3, H, W) with values in ``value_range`` (VAE output: [-1, 1]) ->
    ``pixel_values`` (Σ gh·gw, 3·tp·p·p) (fp32, fp64 for fp64 input) and ``image_grid_thw`` (B, 3), differentiable
    in the pixels."""
    lo, hi = value_range
    if hi <= lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    mean = torch.tensor(config.image_mean, dtype=torch.float32)
    std = torch.tensor(config.image_std, dtype=torch.float32)
    rows, grids = [], []
    for img in images:
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected RGB images (3, H, W), got shape {tuple(img.shape)}")
        x = img.to(torch.promote_types(img.dtype, torch.float32))  # fp64 stays fp64 (finite-difference tests)
        x = (x - lo) / (hi - lo)  # [0, 1], what the processor has after rescale
        th, tw = resized_size(x.shape[1], x.shape[2], config)
        if (th, tw) != tuple(x.shape[1:]):
            x = F.interpolate(x[None], size=(th, tw), mode="bicubic", antialias=True, align_corners=False)[0]
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; the processor's uint8 round trip clips there
        x = (x - mean.to(x)[:, None, None]) / std.to(x)[:, None, None]
        patches, grid = patchify(x, config)
        rows.append(patches)
        grids.append(grid)
    if not rows:
        raise ValueError("no images to preprocess")
    return torch.cat(rows), torch.stack(grids).to(rows[0].device)


def image_token_count(grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """Language-model tokens per image: t·gh·gw / merge_size²."""
    return [int(t * h * w) // (merge_size * merge_size) for t, h, w in grid_thw.tolist()]

"""Pixels to files: uint8 conversion and atomic PNG / MP4 writing (imageio + imageio-ffmpeg)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4",)


def to_uint8(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Values in [-1, 1] (any layout) -> uint8 [0, 255] numpy array of the same shape (clipped, rounded half to
    even). A tensor is converted on its own device, so a GPU decode copies a quarter of the bytes to the host."""
    if isinstance(pixels, torch.Tensor):
        x = (pixels.detach().float() + 1.0) * 127.5
        return torch.round(x).clamp_(0, 255).to(torch.uint8).contiguous().cpu().numpy()
    x = (np.asarray(pixels, dtype=np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def save_media(frames: np.ndarray, path: str | Path, *, fps: int = 24, quality: int | None = None) -> Path:
    """Write uint8 frames (F, H, W, 3) or one image (H, W, 3) to ``path``: .png/.jpg/.webp for a single frame,
    .mp4 (libx264, yuv420p) for video. Written to a temporary file in the same folder and renamed, so a reader
    never sees a half-written file; parent folders are created."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype} (use to_uint8 first)")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3) or (H, W, 3), got shape {frames.shape}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise ValueError(f"unsupported output extension {path.suffix!r}; use .png or .mp4")
    if suffix in IMAGE_SUFFIXES and frames.shape[0] != 1:
        raise ValueError(f"{path.name}: an image file holds one frame, got {frames.shape[0]}; use .mp4 for video")
    if suffix in VIDEO_SUFFIXES and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise ValueError(f"H.264 needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")

    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder -> same filesystem, so os.replace is atomic; the suffix tells imageio which format to write.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix in VIDEO_SUFFIXES:
            writer = imageio.get_writer(
                tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                quality=quality, macro_block_size=1,  # never rescale: our sizes are multiples of 16 already
            )
            try:
                for frame in frames:
                    writer.append_data(frame)
            finally:
                writer.close()
        else:
            imageio.imwrite(tmp, frames[0])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as uint8 (F, H, W, 3) — the inverse of :func:`save_media` for .mp4."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()

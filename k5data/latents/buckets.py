"""Resolution buckets of latent pre-encoding (report §6.1.1, §7.1): which pixel sizes each (modality, area class) may
be encoded at, and the rule that picks one for a frame.

Buckets (pixels, H×W) come from the report: images use the Image Lite rows of Table 4 (LR / MR / HR), videos the
Video Lite LR row of Table 4 (low), Table 2 Lite (medium) and Table 2 Pro (high). The area class of a row is its
curation bucket (short side 256 → low, 512 → medium, 1024 → high; never upscaled: with ``classes`` narrowed, a row
goes to the largest allowed class not above its own).

Inside the class, the bucket whose aspect ratio is nearest to the frame's in log space (``|ln(w/h) - ln(W/H)|``, ties
to the first listed). ``scale`` shrinks every bucket (sides rounded to multiples of 16 px = one latent patch) for
demos."""

from __future__ import annotations

import math

CLASSES = ("low", "medium", "high")
CLASS_OF_BUCKET = {256: "low", 512: "medium", 1024: "high"}  # curation's short-side buckets (report §4.2)
# Which report row lists the supported sizes of each (modality, class); see k5model.training.stages.TABLE4.
BUCKET_SOURCES = {
    ("image", "low"): "image_lite_lr", ("image", "medium"): "image_lite_mr", ("image", "high"): "image_lite_hr",
    ("video", "low"): "video_lite_lr", ("video", "medium"): "video_lite_mr_5s",  # = Table 2, Lite
    ("video", "high"): "video_pro_hr_5s",  # = Table 2, Pro
}
PATCH_PIXELS = 16  # VAE 8x then CrossDiT patch 2: every side must be a multiple of 16 px


def _buckets() -> dict[tuple[str, str], list[tuple[int, int]]]:
    from k5model.training.stages import get_table_stage

    out = {}
    for key, stage in BUCKET_SOURCES.items():
        out[key] = [tuple(int(v) for v in k.split("x")) for k in get_table_stage(stage).resolutions]
    return out  # type: ignore[return-value]


BUCKETS: dict[tuple[str, str], list[tuple[int, int]]] = _buckets()


def scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """Bucket sides x scale, rounded to the nearest multiple of 16 px (at least 16)."""
    return tuple(max(PATCH_PIXELS, int(s * scale / PATCH_PIXELS + 0.5) * PATCH_PIXELS) for s in size)  # type: ignore


def choose_bucket(height: int, width: int, kind: str, res_class: str) -> tuple[int, int]:
    """The supported size of ``res_class`` whose aspect ratio is nearest to ``width/height`` (log space)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    target = math.log(width / height)
    return min(BUCKETS[(kind, res_class)], key=lambda b: abs(math.log(b[1] / b[0]) - target))

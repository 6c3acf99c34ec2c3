"""Planning of latent pre-encoding: one ``EncodeJob`` per passed row of the curated dataset (one image, or one video
scene), with id ``<media_id>-<scene_index>``, its bucket and, for videos, the source frames to decode.

Videos: the scene ``[start_s, end_s)`` is resampled to ``fps`` (source frame ``first + floor(k·src_fps/fps)``) and
cut to the longest ``4k+1`` frame count that fits both the scene and ``max_seconds`` (5 s at 24 fps = 121 frames);
scenes longer than that keep their first ``max_seconds``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from k5data.latents.buckets import CLASS_OF_BUCKET, CLASSES, choose_bucket, scaled

if TYPE_CHECKING:
    from k5data.latents.encode import LatentConfig


@dataclass
class EncodeJob:
    id: str
    kind: str  # image | video
    uri: str
    res_class: str
    size: tuple[int, int]  # target pixels (h, w)
    frames: list[int]  # source frame indices (videos); [] for images
    fps: float
    caption: str
    scores: dict[str, float]
    meta: dict[str, Any]
    edit_source_uri: str | None = None


def sample_id(media_id: str, scene_index: int) -> str:
    return f"{media_id}-{int(scene_index)}"


def clip_frames(start_s: float, end_s: float, src_fps: float, fps: float | None, max_seconds: float) -> list[int]:
    """Source frame indices of a scene resampled to ``fps`` and cut to the longest 4k+1 count within the scene and
    ``max_seconds``; [] when the scene holds no frame."""
    if not src_fps or not math.isfinite(src_fps) or src_fps <= 0:
        raise ValueError(f"video scene needs a positive source fps, got {src_fps!r}")
    fps = fps or src_fps
    first, last = round(start_s * src_fps), round(end_s * src_fps)
    step = src_fps / fps
    available = max(0, math.ceil((last - first) / step - 1e-9))
    n = min(available, int(round(max_seconds * fps)) + 1)
    if n < 1:
        return []
    n = (n - 1) // 4 * 4 + 1
    return [first + int(k * step + 1e-9) for k in range(n)]


def _scores(row: dict[str, Any]) -> dict[str, float]:
    keys = [k for k in row if k.endswith("_score")] + ["quality_technical", "quality_aesthetic", "complexity_edges",
                                                        "complexity_regions", "camera_motion", "object_motion"]
    out = {}
    for k in keys:
        v = row.get(k)
        if isinstance(v, int | float | np.floating | np.integer) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def plan_jobs(df: pd.DataFrame, cfg: LatentConfig) -> tuple[list[EncodeJob], dict[str, str]]:
    """One job per passed row, plus {sample id: reason} of passed rows that cannot be encoded."""
    need = {"media_id", "scene_index", "source_uri", "kind", "width", "height", "bucket", "caption", "passed"}
    missing = sorted(need - set(df.columns))
    if missing:
        raise ValueError(f"curated dataset lacks columns {missing} (is it a k5 curate output?)")
    passed = df[df["passed"].fillna(False).astype(bool)]
    jobs, skipped, seen = [], {}, set()
    for row in passed.to_dict("records"):
        sid = sample_id(row["media_id"], row["scene_index"])
        if sid in seen:
            raise ValueError(f"curated dataset lists passed row {sid} twice")
        seen.add(sid)
        kind = row["kind"]
        if kind not in ("image", "video"):
            raise ValueError(f"row {sid}: kind must be image or video, got {kind!r}")
        own = CLASS_OF_BUCKET.get(int(row["bucket"]))
        allowed = [c for c in cfg.classes if own is not None and CLASSES.index(c) <= CLASSES.index(own)]
        if not allowed:
            skipped[sid] = f"bucket {row['bucket']} has no allowed class in {cfg.classes}"
            continue
        res_class = max(allowed, key=CLASSES.index)
        size = scaled(choose_bucket(int(row["height"]), int(row["width"]), kind, res_class), cfg.scale)
        frames: list[int] = []
        fps = 0.0
        if kind == "video":
            fps = float(cfg.fps or row["fps"])
            frames = clip_frames(float(row["start_s"]), float(row["end_s"]), float(row["fps"]), cfg.fps,
                                 cfg.max_seconds)
            if not frames:
                skipped[sid] = "scene shorter than one frame at the target fps"
                continue
        meta = {"media_id": row["media_id"], "scene_index": int(row["scene_index"]), "source_uri": row["source_uri"],
                "kind": kind, "width": int(row["width"]), "height": int(row["height"]),
                "bucket": f"{size[0]}x{size[1]}", "pixel_frames": max(1, len(frames))}
        for k in ("start_s", "end_s", "domain", "cluster", "t2i_caption", "edit_source_media_id"):
            v = row.get(k)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                meta[k] = v.item() if isinstance(v, np.generic) else v
        if kind == "video":
            meta["source_fps"] = float(row["fps"])
        edit = row.get("edit_source_uri") if kind == "image" else None
        jobs.append(EncodeJob(sid, kind, row["source_uri"], res_class, size, frames, fps, str(row["caption"] or ""),
                              _scores(row), meta, edit if isinstance(edit, str) and edit else None))
    return jobs, skipped

"""VAE pre-encoding of the curated dataset into latent tar shards (report §6.1.1: store latents, not pixels; §7.1).

Every passed row of the curated dataset (one image, or one video scene) becomes one ``LatentSample`` with id
``<media_id>-<scene_index>``, written by ``k5data.latents.shards.write_shards`` to an object store. Re-running skips the ids
already listed in the shard index, so a killed run resumes without encoding anything twice.

Resolution buckets (pixels, H×W) come from the report: images use the Image Lite rows of Table 4 (LR / MR / HR),
videos the Video Lite LR row of Table 4 (low), Table 2 Lite (medium) and Table 2 Pro (high). The area class of a row
is its curation bucket (short side 256 → low, 512 → medium, 1024 → high; never upscaled: with ``classes`` narrowed, a
row goes to the largest allowed class not above its own).

Resize/crop rule: inside the class, the bucket whose aspect ratio is nearest to the frame's in log space
(``|ln(w/h) - ln(W/H)|``, ties to the first listed); the frame is resized to *cover* it (scale
``max(bh/H, bw/W)``, both sides rounded up; area filter when shrinking, bicubic when enlarging) and centre-cropped to
exactly ``bh×bw``. ``scale`` shrinks every bucket (sides rounded to multiples of 16 px = one latent patch) for demos.

Videos: the scene ``[start_s, end_s)`` is resampled to ``fps`` (source frame ``first + floor(k·src_fps/fps)``) and
cut to the longest ``4k+1`` frame count that fits both the scene and ``max_seconds`` (5 s at 24 fps = 121 frames);
scenes longer than that keep their first ``max_seconds``.

Images go through the FLUX VAE when one is given (Image Lite's latent space); without it they are encoded as
1-frame videos by the HunyuanVideo VAE, which is what a *video* model's T2I steps need (one latent space per model).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from k5data.latents.shards import LatentSample, Store, read_index, write_shards
from k5data.object_store import ObjectStore, open_store

CLASSES = ("low", "medium", "high")
CLASS_OF_BUCKET = {256: "low", 512: "medium", 1024: "high"}  # curation's short-side buckets (report §4.2)
# Which report row lists the supported sizes of each (modality, class); see k5model.training.stages.TABLE4.
BUCKET_SOURCES = {
    ("image", "low"): "image_lite_lr", ("image", "medium"): "image_lite_mr", ("image", "high"): "image_lite_hr",
    ("video", "low"): "video_lite_lr", ("video", "medium"): "video_lite_mr_5s",  # = Table 2, Lite
    ("video", "high"): "video_pro_hr_5s",  # = Table 2, Pro
}
PATCH_PIXELS = 16  # VAE 8x then CrossDiT patch 2: every side must be a multiple of 16 px
SLEEP_ENV = "K5_LATENTS_SLEEP_S"  # test hook: pause before each sample goes to the shard writer (kill/resume test)


def _buckets() -> dict[tuple[str, str], list[tuple[int, int]]]:
    from k5model.training.stages import get_table_stage

    out = {}
    for key, stage in BUCKET_SOURCES.items():
        out[key] = [tuple(int(v) for v in k.split("x")) for k in get_table_stage(stage).resolutions]
    return out  # type: ignore[return-value]


BUCKETS: dict[tuple[str, str], list[tuple[int, int]]] = _buckets()


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


# Per supported video resolution (report §7.1: "since Kandinsky 5 supports a limited set of input spatial resolutions,
# we determined optimal tile sizes"; "fewer tiles means less quality loss"). Measured with bench/latent_tiling.py on
# an H100 (fp16, 121 frames, random weights at the real size; diffusers' default = 256-px tiles, 16 frames):
#   low (256x384): no tiles at all, 0.68 s / 20.6 GB and exact (default 1.39 s / 2.5 GB, mean |dz| 0.134);
#   medium (512x768): whole frames in 16-frame causal chunks (bench/vae_encode.py, H200): 1.28 s / 8.1 GB, max |dz|
#   0.039 from the whole-clip encode, against 3.63 s / 13.3 GB and 1.09 for diffusers' 16-frame temporal tiles and
#   5.66 s / 2.9 GB for its default;
#   high (1280x768, 1408x640): 2 tiles along the long side, 10.2 s / 17.1 GB and 9.3 s / 15.6 GB (default 15.4 s and
#   15.0 s at ~3.2 GB; whole frames 10.9 s / 34 GB), max |dz| vs whole frames 0.14-0.15 (default 0.21-0.23); the
#   chunked encoder has not been measured at these sizes yet.
# Override per run with LatentConfig.tiling (e.g. smaller GPUs).
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


@dataclass
class LatentConfig:
    """What to encode and how. ``fps=None`` keeps each clip's own frame rate."""

    fps: float | None = 24.0
    max_seconds: float = 5.0
    scale: float = 1.0  # bucket sides x scale, rounded to multiples of 16 px (demo: 1/8)
    classes: tuple[str, ...] = CLASSES  # area classes to encode at; rows go to the largest allowed <= their own
    image_batch: int = 16
    video_batch: int = 1
    device: str = "cpu"
    vae_dtype: str = "float32"  # "float16" on GPUs, as the official code
    latent_dtype: str = "float32"  # what the shards store
    compile: bool = False  # torch.compile the VAE encoders (one graph per bucket shape)
    tiling: dict[str, TilePlan] = field(default_factory=dict)  # overrides of VIDEO_TILING ("HxW" -> plan)
    per_shard: dict[tuple[str, str], int] | None = None  # samples per archive (default: the report's counts)
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [c for c in self.classes if c not in CLASSES]
        if bad or not self.classes:
            raise ValueError(f"classes must be a non-empty subset of {CLASSES}, got {self.classes}")
        if self.fps is not None and self.fps <= 0 or self.max_seconds <= 0 or not 0 < self.scale <= 1:
            raise ValueError(f"need fps > 0 (or None), max_seconds > 0 and 0 < scale <= 1; got fps={self.fps}, "
                             f"max_seconds={self.max_seconds}, scale={self.scale}")
        if self.image_batch < 1 or self.video_batch < 1:
            raise ValueError(f"batch sizes must be >= 1, got image {self.image_batch}, video {self.video_batch}")
        for name in (self.vae_dtype, self.latent_dtype):
            if name not in ("float32", "float16", "bfloat16"):
                raise ValueError(f"dtype must be float32, float16 or bfloat16, got {name!r}")
        if self.latent_dtype == "bfloat16":
            raise ValueError("latent_dtype bfloat16 has no numpy dtype; store float16 or float32")

    @classmethod
    def demo(cls, **overrides: Any) -> LatentConfig:
        """CPU demo: buckets / 8 (256 px -> 32 px -> 4x4 latents, the demo training stages' sizes), 2 s at 12 fps."""
        return replace(cls(fps=12.0, max_seconds=2.0, scale=1 / 8, image_batch=8, video_batch=2), **overrides)


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


def scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """Bucket sides x scale, rounded to the nearest multiple of 16 px (at least 16)."""
    return tuple(max(PATCH_PIXELS, int(s * scale / PATCH_PIXELS + 0.5) * PATCH_PIXELS) for s in size)  # type: ignore


def choose_bucket(height: int, width: int, kind: str, res_class: str) -> tuple[int, int]:
    """The supported size of ``res_class`` whose aspect ratio is nearest to ``width/height`` (log space)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    target = math.log(width / height)
    return min(BUCKETS[(kind, res_class)], key=lambda b: abs(math.log(b[1] / b[0]) - target))


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
                "kind": kind, "width": int(row["width"]), "height": int(row["height"]), "bucket": f"{size[0]}x{size[1]}",
                "pixel_frames": max(1, len(frames))}
        for k in ("start_s", "end_s", "domain", "cluster"):
            v = row.get(k)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                meta[k] = v.item() if isinstance(v, np.generic) else v
        if kind == "video":
            meta["source_fps"] = float(row["fps"])
        edit = row.get("edit_source_uri") if kind == "image" else None
        jobs.append(EncodeJob(sid, kind, row["source_uri"], res_class, size, frames, fps, str(row["caption"] or ""),
                              _scores(row), meta, edit if isinstance(edit, str) and edit else None))
    return jobs, skipped


# ---------------------------------------------------------------------------------------------------------------------
# pixels


def resize_cover_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (H, W, 3) uint8 to cover ``height × width``, then centre-crop to it (the module's rule)."""
    import cv2

    h, w = rgb.shape[:2]
    s = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * s - 1e-6)), max(width, math.ceil(w * s - 1e-6))
    if (nh, nw) != (h, w):
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


class MediaFetcher:
    """Local paths of media URIs: local files in place, ``s3://`` objects downloaded into ``tmp`` through the object
    store of their bucket (one store per bucket, reused)."""

    def __init__(self, tmp: Path, endpoint_url: str | None = None) -> None:
        self.tmp, self.endpoint_url = Path(tmp), endpoint_url
        self._stores: dict[str, ObjectStore] = {}

    def local(self, uri: str) -> Path:
        from urllib.parse import unquote, urlparse

        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            if parsed.netloc not in self._stores:
                self._stores[parsed.netloc] = open_store(f"s3://{parsed.netloc}", self.endpoint_url)
            dest = self.tmp / f"{len(list(self.tmp.iterdir()))}{Path(parsed.path).suffix}"
            return self._stores[parsed.netloc].get_file(parsed.path.lstrip("/"), dest)
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
        if not path.is_file():
            raise FileNotFoundError(f"media {uri!r} not found")
        return path

    def clear(self) -> None:
        """Delete the downloaded media (the batch is encoded)."""
        for f in self.tmp.iterdir():
            f.unlink()


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_video_frames(path: Path, indices: list[int]) -> np.ndarray:
    """Decode once, front to back, keeping frames ``indices`` (repeats allowed) -> (F, H, W, 3) uint8."""
    import av

    wanted, got = set(indices), {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    if len(got) < len(wanted):
        # the container ended early (frame rate metadata vs real frames): repeat the last decoded frame
        if not got:
            raise ValueError(f"video {path} has no frames in {min(indices)}..{max(indices)}")
        last = got[max(got)]
        got.update({i: last for i in wanted - set(got)})
    return np.stack([got[i] for i in indices])


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, 3, F, H, W) float in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# encoders


class LatentEncoders:
    """The VAEs of one encoding run: HunyuanVideo for videos, FLUX for images (or the video VAE when none)."""

    def __init__(self, video_vae: Any, image_vae: Any | None, cfg: LatentConfig):
        self.video_vae, self.image_vae, self.cfg = video_vae, image_vae, cfg
        if cfg.compile:
            for vae in {id(v): v for v in (video_vae, image_vae) if v is not None}.values():
                vae.vae.encoder = torch.compile(vae.vae.encoder, dynamic=False)

    @classmethod
    def from_pretrained(cls, video_vae: str | os.PathLike, image_vae: str | os.PathLike | None,
                        cfg: LatentConfig) -> LatentEncoders:
        """Load from VAE folders or pipeline folders (their ``vae/``); tiling is set per batch from the table."""
        from k5model.encoders.vae import ImageVAE, VideoVAE

        dtype = getattr(torch, cfg.vae_dtype)
        video = VideoVAE.from_pretrained(video_vae, device=cfg.device, dtype=dtype, tiling=False)
        image = ImageVAE.from_pretrained(image_vae, device=cfg.device, dtype=dtype) if image_vae else None
        return cls(video, image, cfg)

    def vae_name(self, kind: str) -> str:
        return "flux" if kind == "image" and self.image_vae is not None else "hunyuan_video"

    @torch.inference_mode()
    def encode(self, kind: str, frames: np.ndarray) -> np.ndarray:
        """(B, F, H, W, 3) uint8 -> scaled latents (B, T, h, w, 16) in ``latent_dtype``."""
        pixels = _to_tensor(frames)
        if kind == "image" and self.image_vae is not None:
            z = self.image_vae.encode(pixels[:, :, 0])
        else:
            tile_plan(*frames.shape[2:4], self.cfg.tiling).configure(self.video_vae, *frames.shape[2:4])
            z = self.video_vae.encode(pixels)
        return z.float().cpu().numpy().astype(self.cfg.latent_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class EncodeStats:
    encoded: int = 0
    load_s: float = 0.0
    encode_s: float = 0.0
    pixel_frames: int = 0
    latent_bytes: int = 0


def _batches(jobs: list[EncodeJob], cfg: LatentConfig) -> list[list[EncodeJob]]:
    """Jobs grouped by (kind, size, frame count) in a stable order, cut into batches."""
    groups: dict[tuple, list[EncodeJob]] = {}
    for j in sorted(jobs, key=lambda j: (j.kind, j.size, len(j.frames), j.id)):
        groups.setdefault((j.kind, j.size, len(j.frames)), []).append(j)
    out = []
    for (kind, _, _), group in groups.items():
        n = cfg.image_batch if kind == "image" else cfg.video_batch
        out += [group[i:i + n] for i in range(0, len(group), n)]
    return out


def iter_latent_samples(jobs: list[EncodeJob], encoders: LatentEncoders, cfg: LatentConfig,
                        endpoint_url: str | None = None, stats: EncodeStats | None = None) -> Iterator[LatentSample]:
    """Encode ``jobs`` batch by batch (one bucket shape per batch) and yield their samples (tqdm progress)."""
    from tqdm import tqdm

    stats = stats if stats is not None else EncodeStats()
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    with tqdm(total=len(jobs), desc="encode latents", unit="sample", disable=not cfg.progress,
              dynamic_ncols=True) as bar, tempfile.TemporaryDirectory(prefix="k5-latents-") as td:
        fetch = MediaFetcher(Path(td), endpoint_url)
        for batch in _batches(jobs, cfg):
            t0 = time.perf_counter()
            h, w = batch[0].size
            kind = batch[0].kind
            clips, sources = [], []
            for j in batch:
                path = fetch.local(j.uri)
                raw = load_image(path)[None] if kind == "image" else load_video_frames(path, j.frames)
                clips.append(np.stack([resize_cover_crop(f, h, w) for f in raw]))
                if j.edit_source_uri:
                    src = load_image(fetch.local(j.edit_source_uri))
                    sources.append(resize_cover_crop(src, h, w)[None])
            t1 = time.perf_counter()
            z = encoders.encode(kind, np.stack(clips + sources))
            t2 = time.perf_counter()
            fetch.clear()
            stats.load_s += t1 - t0
            stats.encode_s += t2 - t1
            src_of = iter(z[len(batch):])
            for j, lat in zip(batch, z):
                src = next(src_of) if j.edit_source_uri else None
                stats.encoded += 1
                stats.pixel_frames += max(1, len(j.frames))
                stats.latent_bytes += lat.nbytes
                if sleep:
                    time.sleep(sleep)
                yield LatentSample(j.id, np.ascontiguousarray(lat), j.caption, j.fps, j.res_class, j.scores,
                                   None if src is None else np.ascontiguousarray(src),
                                   {**j.meta, "vae": encoders.vae_name(kind)})
                bar.update(1)


def encode_dataset(df: pd.DataFrame, store: Store, prefix: str, encoders: LatentEncoders, cfg: LatentConfig,
                   endpoint_url: str | None = None) -> dict[str, Any]:
    """Encode the passed rows of ``df`` into shards under ``prefix``; rows already in the index are skipped.
    Returns a summary (counts, timings, throughput)."""
    t0 = time.perf_counter()
    jobs, skipped = plan_jobs(df, cfg)
    done = set(read_index(store, prefix).column("sample_id").to_pylist())
    todo = [j for j in jobs if j.id not in done]
    stats = EncodeStats()
    shards = write_shards(iter_latent_samples(todo, encoders, cfg, endpoint_url, stats), store, prefix,
                          per_shard=cfg.per_shard)
    seconds = time.perf_counter() - t0
    index = read_index(store, prefix)
    return {
        "passed_rows": int(df["passed"].fillna(False).astype(bool).sum()), "planned": len(jobs),
        "skipped": skipped, "already_encoded": len(jobs) - len(todo), "encoded": stats.encoded,
        "shards_written": shards, "index_samples": index.num_rows,
        "index_shards": len(set(index.column("shard").to_pylist())), "seconds": seconds,
        "load_seconds": stats.load_s, "encode_seconds": stats.encode_s, "pixel_frames": stats.pixel_frames,
        "latent_bytes": stats.latent_bytes,
        "samples_per_s": stats.encoded / seconds if seconds > 0 else 0.0,
        "frames_per_s_encode": stats.pixel_frames / stats.encode_s if stats.encode_s > 0 else 0.0,
    }


def read_curated(path: str, endpoint_url: str | None = None) -> pd.DataFrame:
    """Every row of a curated dataset (a ``k5 curate`` output folder or ``s3://`` prefix holding ``dataset/``)."""
    from k5data.curation.config import load_config
    from k5data.curation.output import read_dataset

    cfg = load_config(None, {"s3": {"endpoint_url": endpoint_url}} if endpoint_url else None)
    df = read_dataset(path, cfg)
    if df.empty:
        raise FileNotFoundError(f"no curated dataset rows under {path!r} (expected {path}/dataset/**/*.parquet)")
    return df

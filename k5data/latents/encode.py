"""VAE pre-encoding of the curated dataset into latent tar shards (report §6.1.1: store latents, not pixels; §7.1):
the run driver.

``encode_dataset`` plans one job per passed row (``k5data.latents.plan``), loads and crops its pixels
(``k5data.latents.media``) at its bucket (``k5data.latents.buckets``), encodes them with the tiling of
``k5data.latents.tiling`` and writes ``LatentSample``s through ``k5data.latents.shards.write_shards`` to an object
store, holding the prefix's one-writer lease (``k5data.leases``: a second run on the same prefix is refused, naming the
first). Re-running skips the ids already listed in the shard index and takes back the samples a killed run spilled to
``pending/``, so a killed run resumes without encoding anything twice and loses at most ``spill_every`` samples per
class. Rows whose media vanished after curation are skipped and reported, not fatal.

Images go through the FLUX VAE when one is given (Image Lite's latent space); without it they are encoded as
1-frame videos by the HunyuanVideo VAE, which is what a *video* model's T2I steps need (one latent space per model).
"""

from __future__ import annotations

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

from k5data.latents.buckets import CLASSES
from k5data.latents.media import MediaFetcher, load_image, load_video_frames, resize_cover_crop
from k5data.latents.plan import EncodeJob, plan_jobs
from k5data.latents.shards import SPILL_EVERY, LatentSample, ShardWriter, Store, read_index
from k5data.latents.tiling import TilePlan, tile_plan
from k5data.leases import acquire_lease
from k5model.encoders.text import edit_image_for_qwen

SLEEP_ENV = "K5_LATENTS_SLEEP_S"  # test hook: pause before each sample goes to the shard writer (kill/resume test)


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
    spill_every: int = SPILL_EVERY  # encoded samples per class held only in memory before a spill to pending/
    lease_ttl_s: float = 120.0  # the writer lease's expiry without renewal (renewed every third of it)
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [c for c in self.classes if c not in CLASSES]
        if bad or not self.classes:
            raise ValueError(f"classes must be a non-empty subset of {CLASSES}, got {self.classes}")
        if self.fps is not None and self.fps <= 0 or self.max_seconds <= 0 or not 0 < self.scale <= 1:
            raise ValueError(f"need fps > 0 (or None), max_seconds > 0 and 0 < scale <= 1; got fps={self.fps}, "
                             f"max_seconds={self.max_seconds}, scale={self.scale}")
        if self.spill_every < 1 or self.lease_ttl_s <= 0:
            raise ValueError(f"need spill_every >= 1 and lease_ttl_s > 0, got {self.spill_every}, {self.lease_ttl_s}")
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


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, 3, F, H, W) float in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


class ModelFolderError(ValueError):
    """A VAE folder that is missing or does not load; ``str(err)`` is one line naming it and what to pass."""


def _load_vae(load: Any, path: str | os.PathLike, what: str) -> Any:
    """``load()``, with every way a model folder can be broken turned into one ``ModelFolderError`` line."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"{what} folder {str(path)!r} does not exist; pass a VAE folder or a pipeline folder "
                               "with vae/")
    try:
        return load()
    except Exception as err:  # diffusers/safetensors/json raise many types for a broken folder; all mean the same
        detail = " ".join(str(err).split())[:300]
        raise ModelFolderError(f"cannot load the {what} from {str(path)!r} ({type(err).__name__}: {detail}); pass "
                               "a complete VAE folder (config.json + diffusion_pytorch_model.safetensors) or a "
                               "pipeline folder with such a vae/, e.g. one written by `k5 train` or the demo bundles"
                               ) from err


class LatentEncoders:
    """The VAEs of one encoding run: HunyuanVideo for videos, FLUX for images (or the video VAE when none)."""

    def __init__(self, video_vae: Any, image_vae: Any | None, cfg: LatentConfig):
        self.video_vae, self.image_vae, self.cfg = video_vae, image_vae, cfg
        if cfg.compile:
            for vae in {id(v): v for v in (video_vae, image_vae) if v is not None}.values():
                vae.vae.encoder = torch.compile(vae.vae.encoder, dynamic=False)

    @classmethod
    def from_pretrained(cls, video_vae: str | os.PathLike | None, image_vae: str | os.PathLike | None,
                        cfg: LatentConfig) -> LatentEncoders:
        """Load from VAE folders or pipeline folders (their ``vae/``); tiling is set per batch from the table.
        ``video_vae`` None: images only, through ``image_vae`` (the editing pairs' shards)."""
        if video_vae is None and image_vae is None:
            raise ValueError("LatentEncoders needs a video VAE, an image VAE or both; got neither")
        from k5model.encoders.vae import ImageVAE, VideoVAE

        dtype = getattr(torch, cfg.vae_dtype)
        video = _load_vae(lambda: VideoVAE.from_pretrained(video_vae, device=cfg.device, dtype=dtype, tiling=False),
                          video_vae, "video VAE (HunyuanVideo)") if video_vae else None
        image = _load_vae(lambda: ImageVAE.from_pretrained(image_vae, device=cfg.device, dtype=dtype),
                          image_vae, "image VAE (FLUX)") if image_vae else None
        return cls(video, image, cfg)

    def vae_name(self, kind: str) -> str:
        return "flux" if kind == "image" and self.image_vae is not None else "hunyuan_video"

    @torch.inference_mode()
    def encode(self, kind: str, frames: np.ndarray) -> np.ndarray:
        """(B, F, H, W, 3) uint8 -> scaled latents (B, T, h, w, 16) in ``latent_dtype``."""
        pixels = _to_tensor(frames)
        if kind == "image" and self.image_vae is not None:
            z = self.image_vae.encode(pixels[:, :, 0])
        elif self.video_vae is None:
            raise ValueError(f"{kind} samples need a video VAE; this run loaded only the image VAE")
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
    missing: dict[str, str] = field(default_factory=dict)  # sample id -> why its media could not be read


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
        for planned in _batches(jobs, cfg):
            t0 = time.perf_counter()
            h, w = planned[0].size
            kind = planned[0].kind
            clips, sources, batch = [], [], []
            for j in planned:
                try:
                    path = fetch.local(j.uri)
                    src_path = fetch.local(j.edit_source_uri) if j.edit_source_uri else None
                except FileNotFoundError as err:  # deleted after curation: skip it, encode the rest
                    stats.missing[j.id] = f"media vanished since curation ({err}); re-curate to retire the row"
                    bar.update(1)
                    continue
                raw = load_image(path)[None] if kind == "image" else load_video_frames(path, j.frames)
                clips.append(np.stack([resize_cover_crop(f, h, w) for f in raw]))
                if src_path is not None:  # editing pair: the source at the target's bucket
                    sources.append(resize_cover_crop(load_image(src_path), h, w)[None])
                batch.append(j)
            if not batch:
                continue
            t1 = time.perf_counter()
            z = encoders.encode(kind, np.stack(clips + sources))
            t2 = time.perf_counter()
            fetch.clear()
            stats.load_s += t1 - t0
            stats.encode_s += t2 - t1
            src_of = iter(z[len(batch):])
            src_pixels = iter(sources)
            for j, lat in zip(batch, z):
                src = next(src_of) if j.edit_source_uri else None
                # what the edit prompt shows Qwen2.5-VL: the source at half the generation size (official edit path)
                qwen_image = edit_image_for_qwen(next(src_pixels)[0]) if j.edit_source_uri else None
                stats.encoded += 1
                stats.pixel_frames += max(1, len(j.frames))
                stats.latent_bytes += lat.nbytes
                if sleep:
                    time.sleep(sleep)
                yield LatentSample(j.id, np.ascontiguousarray(lat), j.caption, j.fps, j.res_class, j.scores,
                                   None if src is None else np.ascontiguousarray(src),
                                   {**j.meta, "vae": encoders.vae_name(kind)}, qwen_image)
                bar.update(1)


def encode_dataset(df: pd.DataFrame, store: Store, prefix: str, encoders: LatentEncoders, cfg: LatentConfig,
                   endpoint_url: str | None = None, *, holder: str = "k5 latents") -> dict[str, Any]:
    """Encode the passed rows of ``df`` into shards under ``prefix`` as its one writer (``holder`` names this run in
    the lease; a live writer already there raises ``LeaseHeld``); rows already in the index are skipped, samples a
    killed run spilled are taken back. Returns a summary (counts, timings, throughput)."""
    t0 = time.perf_counter()
    jobs, skipped = plan_jobs(df, cfg)
    stats = EncodeStats()
    with acquire_lease(store, prefix, holder=holder, ttl_s=cfg.lease_ttl_s) as lease:
        writer = ShardWriter(store, prefix, lease, cfg.per_shard, spill_every=cfg.spill_every)
        indexed, waiting = set(writer.indexed), set(writer.waiting)
        todo = [j for j in jobs if j.id not in indexed and j.id not in waiting]
        for sample in iter_latent_samples(todo, encoders, cfg, endpoint_url, stats):
            writer.add(sample)
        writer.close()
    seconds = time.perf_counter() - t0
    index = read_index(store, prefix)
    return {
        "passed_rows": int(df["passed"].fillna(False).astype(bool).sum()), "planned": len(jobs),
        "skipped": {**skipped, **stats.missing}, "media_missing": len(stats.missing),
        "already_encoded": sum(j.id in indexed for j in jobs), "recovered_pending": writer.recovered,
        "orphans_deleted": writer.orphans_deleted,
        "took_over_lease_of": lease.took_over.describe() if lease.took_over else None, "encoded": stats.encoded,
        "shards_written": writer.shards_written, "index_samples": index.num_rows,
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

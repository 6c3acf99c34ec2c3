"""Demo generation: short clips from the first MovieGen Video Bench prompts with a pipeline folder, stored in an object
store with their latents and a filmstrip preview, and the check that stored clips are not degenerate. What the
``demo_generation`` asset and its check run; experiment tracking plugs in through a ``GenerationTracker``
(``orchestration.mlflow_tracking.MLflowGenerationTracker`` logs to MLflow), so this module imports no tracker."""

from __future__ import annotations

import base64
import dataclasses
import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from k5data.object_store import ObjectStore

Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class DemoGenerationSettings:
    """Small enough for a CPU demo: 2 clips of 5 frames at 64x64, 4 Euler steps."""

    num_prompts: int = 2
    """Prompts taken from the start of MovieGen Video Bench; one clip each."""
    height: int = 64
    """Clip height in pixels."""
    width: int = 64
    """Clip width in pixels."""
    num_frames: int = 5
    """Frames per clip."""
    num_steps: int = 4
    """Sampler (Euler) steps."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed of every clip's initial noise."""
    fps: int = 8
    """Frame rate of the stored mp4 files."""


class GenerationTracker(Protocol):
    """Where a generation run reports, in order: ``start`` once, ``clip`` per clip, ``finish`` once."""

    def start(self, params: dict[str, Any]) -> None: ...
    def clip(self, index: int, media: Path, metrics: dict[str, float]) -> None: ...
    def finish(self, metrics: dict[str, float], preview: Path, record: dict[str, Any]) -> None: ...


@dataclass
class DemoGenerationResult:
    prompts: list[Any]  # evaluation.prompts.PromptRecord, in clip order
    media_uris: list[str]
    media_keys: list[str]
    latent_keys: list[str]
    videos: list[dict[str, Any]]  # per clip: id, uri, seconds_per_step, timings
    preview_png: bytes
    preview_uri: str
    total_seconds: float
    frame_shape: list[int]  # (F, H, W, 3) every stored clip must decode to


def filmstrip_png(videos: list[np.ndarray]) -> bytes:
    """One row per video, its frames side by side: a still preview of clips the Dagster UI cannot play."""
    from PIL import Image

    rows = [np.concatenate(list(v), axis=1) for v in videos]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG")
    return buf.getvalue()


def generation_params(model_dir: Path, prompts: list[Any], settings: DemoGenerationSettings) -> dict[str, Any]:
    """What a generation run is tracked with: model, sampler settings, resolution and every prompt with its id."""
    s = settings
    params: dict[str, Any] = {
        "model_dir": str(model_dir), "num_prompts": len(prompts), "num_steps": s.num_steps,
        "guidance_scale": s.guidance_scale, "seed": s.seed, "height": s.height, "width": s.width,
        "num_frames": s.num_frames, "resolution": f"{s.height}x{s.width}x{s.num_frames}",
    }
    params.update({f"prompt_{i}": p.prompt for i, p in enumerate(prompts)})
    params.update({f"prompt_id_{i}": p.id for i, p in enumerate(prompts)})
    return params


def generate_demo_clips(model_dir: Path, store: ObjectStore, prefix: str, settings: DemoGenerationSettings,
                        tracker: GenerationTracker | None = None, log: Log = print) -> DemoGenerationResult:
    """Generate one clip per prompt on CPU; store ``<prefix>/video_NN.mp4``, ``latents_NN.npy`` and ``preview.png``.
    ``prefix`` should be unique per run (the asset uses the Dagster run id): re-runs never overwrite media that an
    older tracked run points at."""
    from evaluation.prompts import load_moviegen
    from k5model.media import save_media
    from k5model.pipeline import K5Pipeline

    s = settings
    prompts = load_moviegen(limit=s.num_prompts)
    pipe = K5Pipeline.from_pretrained(model_dir, device="cpu")
    media_uris, media_keys, latent_keys, frames, per_video = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        if tracker:
            tracker.start(generation_params(model_dir, prompts, s))
        for i, rec in enumerate(prompts):
            result = pipe.generate(rec.prompt, height=s.height, width=s.width, num_frames=s.num_frames,
                                   num_steps=s.num_steps, guidance_scale=s.guidance_scale, seed=s.seed, progress=False)
            local = save_media(result.frames, Path(tmp) / f"video_{i:02d}.mp4", fps=s.fps)
            lat = Path(tmp) / f"latents_{i:02d}.npy"
            np.save(lat, result.latents.float().numpy())
            key, lkey = f"{prefix}/{local.name}", f"{prefix}/{lat.name}"
            media_uris.append(store.put_file(local, key))
            store.put_file(lat, lkey)
            media_keys.append(key)
            latent_keys.append(lkey)
            # Sampling time only: text encoding and VAE decode are reported separately.
            sps = result.timings["sample_s"] / s.num_steps
            if tracker:
                tracker.clip(i, local, {"seconds_per_step": sps, "video_seconds": result.timings["total_s"]})
            frames.append(result.frames)
            per_video.append({"id": rec.id, "uri": media_uris[-1], "seconds_per_step": round(sps, 4),
                              **{k: round(v, 3) for k, v in result.timings.items()}})
            log(f"{rec.id}: {media_uris[-1]} ({result.timings['total_s']:.1f} s)")
        total = sum(v["total_s"] for v in per_video)
        preview = filmstrip_png(frames)
        (Path(tmp) / "preview.png").write_bytes(preview)
        preview_uri = store.put_file(Path(tmp) / "preview.png", f"{prefix}/preview.png")
        if tracker:
            tracker.finish({"total_seconds": total,
                            "mean_seconds_per_step": float(np.mean([v["seconds_per_step"] for v in per_video]))},
                           Path(tmp) / "preview.png",
                           {"prompts": [dataclasses.asdict(p) for p in prompts], "videos": per_video})
    return DemoGenerationResult(prompts, media_uris, media_keys, latent_keys, per_video, preview, preview_uri, total,
                                [s.num_frames, s.height, s.width, 3])


def preview_markdown(result: DemoGenerationResult) -> str:
    """The filmstrip inline (base64 PNG) above a table of prompt ids, prompts and stored media URIs."""
    table = "\n".join(f"| {v['id']} | {p.prompt[:80]}… | `{v['uri']}` |" for v, p in zip(result.videos, result.prompts))
    return (f"![filmstrip](data:image/png;base64,{base64.b64encode(result.preview_png).decode()})\n\n"
            f"| id | prompt | media |\n|---|---|---|\n{table}\n")


def degeneracy_problems(frames: np.ndarray, latents: np.ndarray, expected_shape: tuple[int, ...]) -> list[str]:
    """Why a decoded clip (F, H, W, 3) and its latents look broken; empty list if they look like a generation."""
    problems = []
    if tuple(frames.shape) != tuple(expected_shape):
        problems.append(f"shape {tuple(frames.shape)} != expected {tuple(expected_shape)}")
    if not np.isfinite(frames).all() or not np.isfinite(latents).all():
        problems.append("non-finite values")
    # 1 grey level of spread: a NaN/zero generation decodes to a flat clip well below this.
    std = float(np.nan_to_num(frames.astype(np.float32)).std())
    if std < 1.0:
        problems.append(f"(near-)constant frames, std {std:.3f}")
    return problems


def check_stored_clips(store: ObjectStore, media_keys: list[str], latent_keys: list[str],
                       expected_shape: tuple[int, ...]) -> tuple[list[str], list[dict[str, Any]]]:
    """Read every stored clip and its latents back and list what looks broken; returns (problems, per-clip stats).
    What was persisted is checked, not in-memory tensors: that is what consumers will read."""
    from k5model.media import read_video

    problems: list[str] = []
    stats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, lkey in zip(media_keys, latent_keys):
            frames = read_video(store.get_file(key, Path(tmp) / Path(key).name)).astype(np.float32)
            latents = np.load(store.get_file(lkey, Path(tmp) / Path(lkey).name))
            stats.append({"key": key, "shape": list(frames.shape), "std": round(float(frames.std()), 3),
                          "latents_finite": bool(np.isfinite(latents).all())})
            problems += [f"{key}: {p}" for p in degeneracy_problems(frames, latents, expected_shape)]
    if not stats:
        problems.append("no media recorded in the materialization")
    return problems, stats

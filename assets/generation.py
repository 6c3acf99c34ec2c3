"""Generation assets: a short demo run of the tiny pipeline, tracked in MLflow, media in the object store."""

# No `from __future__ import annotations`: Dagster inspects the real `context` type hints at definition time.
import base64
import dataclasses
import io
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from assets.models import tiny_model_bundle
from k5model.media import read_video
from orchestration.lineage import latest_metadata, upstream_path
from orchestration.resources import MLflowResource, ObjectStoreResource

MEDIA_PREFIX = "demo_generation"


class DemoGenerationConfig(dg.Config):
    """Small enough for a CPU demo: 2 clips of 5 frames at 64x64, 4 Euler steps."""

    num_prompts: int = 2
    height: int = 64
    width: int = 64
    num_frames: int = 5
    num_steps: int = 4
    guidance_scale: float = 5.0
    seed: int = 0
    fps: int = 8


def filmstrip_png(videos: list[np.ndarray]) -> bytes:
    """One row per video, its frames side by side: a still preview of clips the Dagster UI cannot play."""
    from PIL import Image

    rows = [np.concatenate(list(v), axis=1) for v in videos]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG")
    return buf.getvalue()


@dg.asset(
    group_name="generation",
    deps=[tiny_model_bundle],
    kinds={"pytorch", "mlflow"},
    owners=["team:k5-lifecycle"],
    tags={"stage": "generation"},
    description="Two short videos from the first MovieGen Video Bench prompts with the tiny pipeline; "
    "media in the object store, params/metrics/artifacts in MLflow.",
)
def demo_generation(
    context: dg.AssetExecutionContext,
    config: DemoGenerationConfig,
    mlflow: MLflowResource,
    object_store: ObjectStoreResource,
) -> dg.MaterializeResult:
    import mlflow as mlflow_lib

    from evaluation.prompts import load_moviegen
    from k5model.media import save_media
    from k5model.pipeline import K5Pipeline

    model_dir = upstream_path(context, tiny_model_bundle.key)
    prompts = load_moviegen(limit=config.num_prompts)
    pipe = K5Pipeline.from_pretrained(model_dir, device="cpu")
    # Keys carry the Dagster run id: re-runs never overwrite media that an older MLflow run points at.
    prefix = f"{MEDIA_PREFIX}/{context.run.run_id}"
    tags = {"dagster_run_id": context.run.run_id, "dagster_asset": context.asset_key.to_user_string()}
    params: dict[str, Any] = {
        "model_dir": str(model_dir),
        "num_prompts": len(prompts),
        "num_steps": config.num_steps,
        "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "height": config.height,
        "width": config.width,
        "num_frames": config.num_frames,
        "resolution": f"{config.height}x{config.width}x{config.num_frames}",
    }
    params.update({f"prompt_{i}": p.prompt for i, p in enumerate(prompts)})
    params.update({f"prompt_id_{i}": p.id for i, p in enumerate(prompts)})

    media_uris, media_keys, latent_keys, videos, per_video = [], [], [], [], []
    with mlflow.start_run("demo_generation", tags=tags) as run, tempfile.TemporaryDirectory() as tmp:
        mlflow_lib.log_params(params)
        for i, rec in enumerate(prompts):
            result = pipe.generate(
                rec.prompt, height=config.height, width=config.width, num_frames=config.num_frames,
                num_steps=config.num_steps, guidance_scale=config.guidance_scale, seed=config.seed, progress=False,
            )
            local = save_media(result.frames, Path(tmp) / f"video_{i:02d}.mp4", fps=config.fps)
            lat = Path(tmp) / f"latents_{i:02d}.npy"
            np.save(lat, result.latents.float().numpy())
            key, lkey = f"{prefix}/{local.name}", f"{prefix}/{lat.name}"
            media_uris.append(object_store.put_file(local, key))
            object_store.put_file(lat, lkey)
            media_keys.append(key)
            latent_keys.append(lkey)
            mlflow_lib.log_artifact(str(local), artifact_path="media")
            # Sampling time only: text encoding and VAE decode are reported separately.
            sps = result.timings["sample_s"] / config.num_steps
            mlflow_lib.log_metrics(
                {"seconds_per_step": sps, "video_seconds": result.timings["total_s"]}, step=i
            )
            videos.append(result.frames)
            per_video.append({"id": rec.id, "uri": media_uris[-1], "seconds_per_step": round(sps, 4),
                              **{k: round(v, 3) for k, v in result.timings.items()}})
            context.log.info(f"{rec.id}: {media_uris[-1]} ({result.timings['total_s']:.1f} s)")

        total = sum(v["total_s"] for v in per_video)
        mlflow_lib.log_metrics({
            "total_seconds": total,
            "mean_seconds_per_step": float(np.mean([v["seconds_per_step"] for v in per_video])),
        })
        preview = filmstrip_png(videos)
        (Path(tmp) / "preview.png").write_bytes(preview)
        preview_uri = object_store.put_file(Path(tmp) / "preview.png", f"{prefix}/preview.png")
        mlflow_lib.log_artifact(str(Path(tmp) / "preview.png"))
        mlflow_lib.log_dict({"prompts": [dataclasses.asdict(p) for p in prompts], "videos": per_video}, "generation.json")
        run_url = mlflow.run_url(run)
        run_id = run.info.run_id

    table = "\n".join(f"| {v['id']} | {p.prompt[:80]}… | `{v['uri']}` |" for v, p in zip(per_video, prompts))
    md = (f"![filmstrip](data:image/png;base64,{base64.b64encode(preview).decode()})\n\n"
          f"| id | prompt | media |\n|---|---|---|\n{table}\n")
    return dg.MaterializeResult(
        metadata={
            "mlflow_run_url": dg.MetadataValue.url(run_url),
            "mlflow_run_id": run_id,
            "media": dg.MetadataValue.json(media_uris),
            "media_keys": dg.MetadataValue.json(media_keys),
            "latent_keys": dg.MetadataValue.json(latent_keys),
            "frame_shape": dg.MetadataValue.json([config.num_frames, config.height, config.width, 3]),
            "preview": dg.MetadataValue.md(md),
            "preview_uri": dg.MetadataValue.url(preview_uri),
            "total_seconds": dg.MetadataValue.float(total),
            "videos": dg.MetadataValue.json(per_video),
        }
    )


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


@dg.asset_check(asset=demo_generation, blocking=True, description="Stored clips decode to the expected shape, "
                "are not constant, and their latents are finite.")
def demo_generation_is_not_degenerate(
    context: dg.AssetCheckExecutionContext, object_store: ObjectStoreResource
) -> dg.AssetCheckResult:
    # Checks what was persisted (object store), not the in-memory tensors: that is what consumers will read.
    meta = latest_metadata(context, demo_generation.key)
    expected = tuple(meta["frame_shape"])
    problems: list[str] = []
    stats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, lkey in zip(meta["media_keys"], meta["latent_keys"]):
            frames = read_video(object_store.get_file(key, Path(tmp) / Path(key).name)).astype(np.float32)
            latents = np.load(object_store.get_file(lkey, Path(tmp) / Path(lkey).name))
            stats.append({"key": key, "shape": list(frames.shape), "std": round(float(frames.std()), 3),
                          "latents_finite": bool(np.isfinite(latents).all())})
            problems += [f"{key}: {p}" for p in degeneracy_problems(frames, latents, expected)]
    if not stats:
        problems.append("no media recorded in the materialization")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"videos": dg.MetadataValue.json(stats), "problems": dg.MetadataValue.json(problems)},
        description="; ".join(problems) or None,
    )

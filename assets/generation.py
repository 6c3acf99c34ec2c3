"""Generation assets: a short demo run of the tiny pipeline, tracked in MLflow, media in the object store. The work is
in ``evaluation.demo_generation``; MLflow logging in ``orchestration.mlflow_tracking``."""

# No `from __future__ import annotations`: Dagster inspects the real `context` type hints at definition time.
import dagster as dg

from assets.models import tiny_model_bundle
from evaluation.demo_generation import DemoGenerationSettings, check_stored_clips, generate_demo_clips, preview_markdown
from orchestration.lineage import latest_metadata, upstream_path
from orchestration.mlflow_tracking import MLflowGenerationTracker
from orchestration.resources import MLflowResource, ObjectStoreResource

MEDIA_PREFIX = "demo_generation"
_DEFAULTS = DemoGenerationSettings()


class DemoGenerationConfig(dg.Config):
    """Small enough for a CPU demo: 2 clips of 5 frames at 64x64, 4 Euler steps (``DemoGenerationSettings``)."""

    num_prompts: int = _DEFAULTS.num_prompts
    height: int = _DEFAULTS.height
    width: int = _DEFAULTS.width
    num_frames: int = _DEFAULTS.num_frames
    num_steps: int = _DEFAULTS.num_steps
    guidance_scale: float = _DEFAULTS.guidance_scale
    seed: int = _DEFAULTS.seed
    fps: int = _DEFAULTS.fps


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
    # Keys carry the Dagster run id: re-runs never overwrite media that an older MLflow run points at.
    prefix = f"{MEDIA_PREFIX}/{context.run.run_id}"
    tags = {"dagster_run_id": context.run.run_id, "dagster_asset": context.asset_key.to_user_string()}
    with mlflow.start_run("demo_generation", tags=tags) as run:
        result = generate_demo_clips(upstream_path(context, tiny_model_bundle.key), object_store.store(), prefix,
                                     DemoGenerationSettings(**config.model_dump()), MLflowGenerationTracker(),
                                     log=context.log.info)
    return dg.MaterializeResult(metadata={
        "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(run)),
        "mlflow_run_id": run.info.run_id,
        "media": dg.MetadataValue.json(result.media_uris),
        "media_keys": dg.MetadataValue.json(result.media_keys),
        "latent_keys": dg.MetadataValue.json(result.latent_keys),
        "frame_shape": dg.MetadataValue.json(result.frame_shape),
        "preview": dg.MetadataValue.md(preview_markdown(result)),
        "preview_uri": dg.MetadataValue.url(result.preview_uri),
        "total_seconds": dg.MetadataValue.float(result.total_seconds),
        "videos": dg.MetadataValue.json(result.videos),
    })


@dg.asset_check(asset=demo_generation, blocking=True, description="Stored clips decode to the expected shape, "
                "are not constant, and their latents are finite.")
def demo_generation_is_not_degenerate(
    context: dg.AssetCheckExecutionContext, object_store: ObjectStoreResource
) -> dg.AssetCheckResult:
    meta = latest_metadata(context, demo_generation.key)
    problems, stats = check_stored_clips(object_store.store(), meta["media_keys"], meta["latent_keys"],
                                         tuple(meta["frame_shape"]))
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"videos": dg.MetadataValue.json(stats), "problems": dg.MetadataValue.json(problems)},
        description="; ".join(problems) or None,
    )

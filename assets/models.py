"""Model assets: pipeline folders that later assets load from."""

# No `from __future__ import annotations`: Dagster inspects the real `context` type hints at definition time.
from pathlib import Path

import dagster as dg

from orchestration.resources import K5HomeResource

TINY_KIND = "t2v"
TINY_SEED = 0


def tiny_model_dir(home: K5HomeResource) -> Path:
    return home.paths.models / f"tiny_{TINY_KIND}"


def build_tiny_bundle_asset(name: str, kind: str, what: str) -> dg.AssetsDefinition:
    """A tiny random Kandinsky 5 pipeline folder of ``kind`` (diffusers layout) as an asset: the base pipeline whose
    frozen parts (text encoders, VAE) the demo's stages train and export with."""

    @dg.asset(name=name, group_name="models", kinds={"pytorch", "diffusers"}, owners=["team:k5-lifecycle"],
              tags={"stage": "model"}, code_version=f"tiny-{kind}-seed{TINY_SEED}",
              description=f"Tiny random Kandinsky 5 {what} pipeline folder (diffusers layout) for CPU demos and tests.")
    def _bundle(context: dg.AssetExecutionContext, k5_home: K5HomeResource) -> dg.MaterializeResult:
        from k5model.checkpoint import component_parameter_counts
        from k5model.tiny import build_tiny_pipeline

        # Idempotent: a complete folder of the same kind/seed is reused, so re-materializing is cheap.
        path = build_tiny_pipeline(k5_home.paths.models / f"tiny_{kind}", kind=kind, seed=TINY_SEED)
        counts = component_parameter_counts(path)
        context.log.info(f"tiny pipeline at {path}: {sum(counts.values()):,} parameters")
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)), "kind": kind, "seed": TINY_SEED,
            "parameter_count": dg.MetadataValue.int(sum(counts.values())),
            "transformer_parameters": dg.MetadataValue.int(counts.get("transformer", 0)),
            "components": dg.MetadataValue.json(counts)})

    return _bundle


tiny_model_bundle = build_tiny_bundle_asset("tiny_model_bundle", TINY_KIND, "T2V")
tiny_image_bundle = build_tiny_bundle_asset("tiny_image_bundle", "t2i", "T2I")

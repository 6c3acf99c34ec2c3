"""Model assets: pipeline folders that later assets load from."""

# No `from __future__ import annotations`: Dagster inspects the real `context` type hints at definition time.
from pathlib import Path

import dagster as dg

from orchestration.resources import K5HomeResource

TINY_KIND = "t2v"
TINY_SEED = 0


def tiny_model_dir(home: K5HomeResource) -> Path:
    return home.paths.models / f"tiny_{TINY_KIND}"


@dg.asset(
    group_name="models",
    kinds={"pytorch", "diffusers"},
    owners=["team:k5-lifecycle"],
    tags={"stage": "model"},
    code_version=f"tiny-{TINY_KIND}-seed{TINY_SEED}",
    description="Tiny random Kandinsky 5 T2V pipeline folder (diffusers layout) for CPU demos and tests.",
)
def tiny_model_bundle(context: dg.AssetExecutionContext, k5_home: K5HomeResource) -> dg.MaterializeResult:
    from k5model.checkpoint import component_parameter_counts
    from k5model.tiny import build_tiny_pipeline

    # Idempotent: a complete folder of the same kind/seed is reused, so re-materializing is cheap.
    path = build_tiny_pipeline(tiny_model_dir(k5_home), kind=TINY_KIND, seed=TINY_SEED)
    counts = component_parameter_counts(path)
    context.log.info(f"tiny pipeline at {path}: {sum(counts.values()):,} parameters")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "kind": TINY_KIND,
            "seed": TINY_SEED,
            "parameter_count": dg.MetadataValue.int(sum(counts.values())),
            "transformer_parameters": dg.MetadataValue.int(counts.get("transformer", 0)),
            "components": dg.MetadataValue.json(counts),
        }
    )

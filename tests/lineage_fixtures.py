"""Upstream of the training stages for tests that materialize stages alone: latent shards in the real archive format
(random latents at the demo's sizes, written by ``k5data.latents.shards.write_shards``) and the base pipelines,
recorded as materializations of the latent sets / ``tiny_model_bundle`` / ``tiny_image_bundle`` in the instance,
exactly as those assets record them. The full chain from raw media runs in ``make demo``."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np

from k5data.latents.shards import LatentSample, write_shards
from k5data.object_store import LocalStore

# (modality, class, latent shape T x H x W): the demo corpus's buckets / 8
SHAPES = [("video", "low", (2, 4, 6)), ("video", "low", (2, 6, 4)), ("video", "medium", (2, 8, 12)),
          ("image", "low", (1, 4, 4)), ("image", "medium", (1, 8, 8))]


def write_test_shards(store_root: Path, prefix: str = "latents", per_shape: int = 4, seed: int = 0) -> LocalStore:
    rng = np.random.default_rng(seed)
    samples = []
    for modality, res_class, shape in SHAPES:
        for k in range(per_shape):
            latent = rng.standard_normal((*shape, 16)).astype(np.float16)
            samples.append(LatentSample(f"{modality}-{res_class}-{'x'.join(map(str, shape))}-{k}", latent,
                                        f"a {modality} of a red fox number {k}", 12.0, res_class))
    store = LocalStore(store_root)
    write_shards(samples, store, prefix)
    return store


def record_training_upstream(instance: dg.DagsterInstance, store_root: Path, t2v_dir: Path, t2i_dir: Path,
                             prefix: str = "latents") -> None:
    """Write test shards under ``store_root`` and record the three upstream materializations of a stage."""
    store = write_test_shards(store_root, prefix)
    classes = sorted({(m, c) for m, c, _ in SHAPES})
    for key in ("latent_shards", "image_latent_shards"):  # one set of archives stands in for both latent spaces
        instance.report_runless_asset_event(dg.AssetMaterialization(
            key, metadata={"prefix": prefix, "index_uri": store.uri(f"{prefix}/index.parquet"),
                           "dataset_snapshot": "test-shards@seed0",
                           "classes": dg.MetadataValue.json([list(c) for c in classes])}))
    for key, folder in (("tiny_model_bundle", t2v_dir), ("tiny_image_bundle", t2i_dir)):
        instance.report_runless_asset_event(dg.AssetMaterialization(key, metadata={"path": str(folder)}))

"""Latent assets (report §6.1.1, group ``latents``): the passed rows of ``curated_dataset`` VAE-encoded into tar shards
with a Parquet index in the object store (``k5data.latents.encode``), and a check that the index is complete and loads.

``make demo`` encodes at demo sizes (buckets / 8, 2 s clips at 12 fps) with the tiny bundle's HunyuanVideo VAE
(images as 1-frame videos: the tiny bundle is a T2V pipeline, and a video model's T2I steps need that latent space);
production runs set ``demo: false``, a FLUX ``image_vae`` for Image Lite, and a GPU ``device``."""

# No `from __future__ import annotations`: Dagster inspects the real `context` type hints at definition time.
from collections import Counter
from typing import Any

import dagster as dg

from assets.curation import curated_dataset
from assets.models import tiny_model_bundle
from orchestration.lineage import latest_metadata, upstream_path
from orchestration.resources import CurationResource, ObjectStoreResource


class LatentShardsConfig(dg.Config):
    prefix: str = "latents"  # key prefix in the object store (shards/ + index.parquet)
    demo: bool = True  # CPU demo sizes; False: the report's buckets, 5 s at 24 fps
    video_vae: str | None = None  # HunyuanVideo VAE or pipeline folder; unset: the tiny model bundle's
    image_vae: str | None = None  # FLUX VAE or T2I pipeline folder; unset: images through the video VAE
    device: str = "cpu"
    vae_dtype: str = "float32"
    compile: bool = False
    fps: float | None = None
    max_seconds: float | None = None


def _latent_config(config: LatentShardsConfig) -> Any:
    from k5data.latents.encode import LatentConfig

    overrides = {k: v for k, v in {"fps": config.fps, "max_seconds": config.max_seconds}.items() if v is not None}
    overrides.update(device=config.device, vae_dtype=config.vae_dtype, compile=config.compile, progress=False)
    return LatentConfig.demo(**overrides) if config.demo else LatentConfig(**overrides)


def _curated_rows(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
                  curation: CurationResource) -> Any:
    from k5data.curation.output import read_dataset

    return read_dataset(str(latest_metadata(context, curated_dataset.key)["path"]), curation.config())


def index_summary(store: Any, prefix: str) -> dict[str, Any]:
    """Samples and archives per (modality, resolution class) of a shard index, as metadata."""
    from k5data.latents.shards import read_index

    index = read_index(store, prefix)
    per_class = Counter(zip(index.column("modality").to_pylist(), index.column("res_class").to_pylist()))
    shards = Counter((sh.split("/")[1], sh.split("/")[2]) for sh in set(index.column("shard").to_pylist()))
    table = "| modality | class | samples | shards |\n|---|---|---|---|\n" + "".join(
        f"| {m} | {r} | {n} | {shards[(m, r)]} |\n" for (m, r), n in sorted(per_class.items()))
    return {"buckets": dg.MetadataValue.md(table), "classes": dg.MetadataValue.json(sorted(map(list, per_class)))}


def dataset_snapshot(context: dg.AssetExecutionContext) -> str:
    """The curated dataset version the shards come from: its path and the Dagster run that wrote it."""
    event = context.instance.get_latest_materialization_event(curated_dataset.key)
    meta = latest_metadata(context, curated_dataset.key)
    return f"{meta['path']}@{event.run_id}" if event is not None else str(meta["path"])


@dg.asset(
    deps=[curated_dataset, tiny_model_bundle],
    group_name="latents",
    kinds={"pytorch", "parquet"},
    owners=["team:k5-lifecycle"],
    description="Passed curated rows VAE-encoded (HunyuanVideo for videos, FLUX or HunyuanVideo for images) at the "
    "report's resolution buckets into tar shards + a Parquet index in the object store; re-runs resume.",
)
def latent_shards(context: dg.AssetExecutionContext, config: LatentShardsConfig, curation: CurationResource,
                  object_store: ObjectStoreResource) -> dg.MaterializeResult:
    from k5data.latents.encode import LatentEncoders, encode_dataset

    cfg = _latent_config(config)
    video_vae = config.video_vae or str(upstream_path(context, tiny_model_bundle.key))
    encoders = LatentEncoders.from_pretrained(video_vae, config.image_vae, cfg)
    store, prefix = object_store.store(), config.prefix.strip("/")
    summary = encode_dataset(_curated_rows(context, curation), store, prefix, encoders, cfg,
                             curation.config().endpoint_url)
    context.log.info(f"latent shards at {store.uri(prefix)}: {summary}")
    return dg.MaterializeResult(metadata={
        "prefix": prefix, "index_uri": store.uri(f"{prefix}/index.parquet"),
        "dataset_snapshot": dataset_snapshot(context),
        "samples": summary["index_samples"], "shards": summary["index_shards"], "encoded": summary["encoded"],
        "already_encoded": summary["already_encoded"], "skipped": dg.MetadataValue.json(summary["skipped"]),
        "seconds": summary["seconds"], "samples_per_s": summary["samples_per_s"],
        "vae_frames_per_s": summary["frames_per_s_encode"], "latent_bytes": summary["latent_bytes"],
        "video_vae": video_vae, "image_vae": config.image_vae or "(video VAE, 1-frame videos)",
        **index_summary(store, prefix),
        "config": dg.MetadataValue.json({k: v for k, v in vars(cfg).items() if k not in ("tiling", "per_shard")}),
    })


def _decode_problems(sample: Any, meta: dict[str, Any]) -> list[str]:
    """Decode one stored latent with the VAE that encoded it; problems with its shapes or values."""
    import numpy as np
    import torch

    from k5model.encoders.vae import ImageVAE, VideoVAE

    problems = []
    if not np.isfinite(sample.latent).all():
        problems.append(f"{sample.id}: non-finite latent values")
    flux = sample.meta.get("vae") == "flux"
    vae = (ImageVAE if flux else VideoVAE).from_pretrained(meta["image_vae"] if flux else meta["video_vae"])
    pixels = vae.decode(torch.from_numpy(sample.latent.astype(np.float32))[None])
    h, w = (int(v) for v in sample.meta["bucket"].split("x"))
    frames = 1 if flux else pixels.shape[2]
    want = int(sample.meta["pixel_frames"])
    if tuple(pixels.shape[-2:]) != (h, w) or frames != want:
        problems.append(f"{sample.id}: decoded to {frames} frames of {tuple(pixels.shape[-2:])}, expected {want} of "
                        f"{(h, w)}")
    if not torch.isfinite(pixels).all():
        problems.append(f"{sample.id}: decoded pixels are not finite")
    return problems


@dg.asset_check(asset=latent_shards, description="The shard index lists every passed curated row exactly once (none "
                "missing, none extra), every listed archive exists, and a sample loads and decodes with its VAE.")
def latent_index_complete(context: dg.AssetCheckExecutionContext, curation: CurationResource,
                          object_store: ObjectStoreResource) -> dg.AssetCheckResult:
    from k5data.latents.plan import sample_id
    from k5data.latents.shards import read_index, read_tar

    meta = latest_metadata(context, latent_shards.key)
    store, prefix = object_store.store(), str(meta["prefix"])
    index = read_index(store, prefix)
    ids = index.column("sample_id").to_pylist()
    df = _curated_rows(context, curation)
    passed = df[df["passed"].fillna(False).astype(bool)]
    expected = {sample_id(m, s) for m, s in zip(passed["media_id"], passed["scene_index"])} - set(meta["skipped"])
    missing, extra = sorted(expected - set(ids)), sorted(set(ids) - expected)
    duplicates = len(ids) - len(set(ids))
    shards = sorted(set(index.column("shard").to_pylist()))
    absent = [sh for sh in shards if not store.exists(f"{prefix}/{sh}")]
    problems = [f"{len(missing)} passed rows missing, e.g. {missing[:3]}"] if missing else []
    problems += [f"{len(extra)} samples not in the curated dataset, e.g. {extra[:3]}"] if extra else []
    problems += [f"{duplicates} duplicate sample ids"] if duplicates else []
    problems += [f"{len(absent)} listed archives missing, e.g. {absent[:3]}"] if absent else []
    decoded = None
    if shards and not absent:
        with store.open_read(f"{prefix}/{shards[0]}") as f:
            sample = next(read_tar(f))
        problems += _decode_problems(sample, meta)
        decoded = sample.id
    return dg.AssetCheckResult(passed=not problems and bool(ids), description="; ".join(problems) or None, metadata={
        "passed_rows": len(passed), "expected": len(expected), "indexed": len(ids), "missing": len(missing),
        "extra": len(extra), "duplicates": duplicates, "archives": len(shards), "decoded_sample": decoded or ""})

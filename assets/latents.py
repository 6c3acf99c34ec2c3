"""Latent assets (report §6.1.1, group ``latents``): the passed rows of ``curated_dataset`` VAE-encoded into tar shards
with a Parquet index in the object store (``k5data.latents.encode``), and a check that each index is complete and loads.

Two latent sets, one factory: ``latent_shards`` holds videos and images through the HunyuanVideo VAE (images as
1-frame videos: the video models' T2I steps train in that latent space), ``image_latent_shards`` the images through the
image VAE (FLUX in production) that Image Lite trains and decodes with. ``make demo`` encodes at demo sizes (buckets /
8, 2 s clips at 12 fps) with the tiny bundles' VAEs; production runs set ``demo: false``, the real VAEs and a GPU
``device``."""

# No `from __future__ import annotations`: Dagster inspects the real `context` type hints at definition time.
from collections import Counter
from dataclasses import dataclass
from typing import Any

import dagster as dg

from assets.curation import curated_dataset
from orchestration.lineage import latest_metadata, upstream_path
from orchestration.production import gpu_op_tags
from orchestration.resources import CurationResource, ObjectStoreResource


@dataclass(frozen=True)
class LatentSet:
    """One family member: which rows it encodes, where, and whose VAEs the demo uses."""

    prefix: str  # key prefix in the object store (shards/ + index.json -> indexes/)
    kinds: tuple[str, ...]  # curated row kinds it encodes
    video_bundle: str  # asset whose pipeline folder holds the video VAE
    image_bundle: str | None  # asset whose pipeline folder holds the image VAE (None: images through the video VAE)
    what: str


LATENT_SETS = {
    "latent_shards": LatentSet("latents", ("image", "video"), "tiny_model_bundle", None,
                               "videos and images through the video VAE (the video models' latent space)"),
    "image_latent_shards": LatentSet("latents_image", ("image",), "tiny_model_bundle", "tiny_image_bundle",
                                     "images through the image VAE (Image Lite's latent space)"),
}


class LatentShardsConfig(dg.Config):
    prefix: str | None = None  # key prefix in the object store; unset: the latent set's own
    demo: bool = True  # CPU demo sizes; False: the report's buckets, 5 s at 24 fps
    video_vae: str | None = None  # HunyuanVideo VAE or pipeline folder; unset: the set's tiny bundle's
    image_vae: str | None = None  # FLUX VAE or T2I pipeline folder; unset: the set's image bundle (if any)
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
                  curation: CurationResource, kinds: tuple[str, ...] = ("image", "video")) -> Any:
    from k5data.curation.output import read_dataset

    df = read_dataset(str(latest_metadata(context, curated_dataset.key)["path"]), curation.config())
    return df[df["kind"].isin(kinds)]


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


def build_latent_asset(name: str, spec: LatentSet) -> dg.AssetsDefinition:
    @dg.asset(name=name, deps=[curated_dataset, spec.video_bundle, *([spec.image_bundle] if spec.image_bundle else [])],
              group_name="latents", kinds={"pytorch", "parquet"}, owners=["team:k5-lifecycle"],
              op_tags=gpu_op_tags(1),  # the VAE encode's step pod gets a GPU under k8s_job_executor (K5_EXECUTOR=k8s)
              description=f"Passed curated rows, {spec.what}, VAE-encoded at the report's resolution buckets into tar "
              "shards + a Parquet index in the object store; re-runs resume.")
    def _latents(context: dg.AssetExecutionContext, config: LatentShardsConfig, curation: CurationResource,
                 object_store: ObjectStoreResource) -> dg.MaterializeResult:
        from k5data.latents.encode import LatentEncoders, encode_dataset
        from k5data.latents.shards import index_uri
        from k5data.leases import LeaseHeld

        cfg = _latent_config(config)
        video_vae = config.video_vae or str(upstream_path(context, spec.video_bundle))
        image_vae = config.image_vae or (str(upstream_path(context, spec.image_bundle)) if spec.image_bundle else None)
        encoders = LatentEncoders.from_pretrained(video_vae, image_vae, cfg)
        store, prefix = object_store.store(), (config.prefix or spec.prefix).strip("/")
        try:  # one writer per prefix: a concurrent run of this asset (or `k5 latents`) is refused, naming it
            summary = encode_dataset(_curated_rows(context, curation, spec.kinds), store, prefix, encoders, cfg,
                                     curation.config().endpoint_url, holder=f"Dagster run {context.run_id} ({name})")
        except LeaseHeld as err:
            raise dg.Failure(str(err)) from None
        context.log.info(f"latent shards at {store.uri(prefix)}: {summary}")
        return dg.MaterializeResult(metadata={
            "prefix": prefix, "index_uri": index_uri(store, prefix), "kinds": ",".join(spec.kinds),
            "dataset_snapshot": dataset_snapshot(context),
            "samples": summary["index_samples"], "shards": summary["index_shards"], "encoded": summary["encoded"],
            "already_encoded": summary["already_encoded"], "skipped": dg.MetadataValue.json(summary["skipped"]),
            "media_missing": summary["media_missing"], "recovered_pending": summary["recovered_pending"],
            "seconds": summary["seconds"], "samples_per_s": summary["samples_per_s"],
            "vae_frames_per_s": summary["frames_per_s_encode"], "latent_bytes": summary["latent_bytes"],
            "video_vae": video_vae, "image_vae": image_vae or "(video VAE, 1-frame videos)",
            **index_summary(store, prefix),
            "config": dg.MetadataValue.json({k: v for k, v in vars(cfg).items() if k not in ("tiling", "per_shard")}),
        })

    return _latents


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


def build_latent_check(name: str, spec: LatentSet) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=name, name="latent_index_complete", description="The shard index lists every passed "
                    f"curated row of kinds {', '.join(spec.kinds)} exactly once (none missing, none extra), every "
                    "listed archive exists, and a sample loads and decodes with its VAE.")
    def _check(context: dg.AssetCheckExecutionContext, curation: CurationResource,
               object_store: ObjectStoreResource) -> dg.AssetCheckResult:
        meta = latest_metadata(context, name)
        return index_check(object_store.store(), meta, _curated_rows(context, curation, spec.kinds))

    return _check


def index_check(store: Any, meta: dict[str, Any], df: Any) -> dg.AssetCheckResult:
    """Compare a shard index with the passed rows it should hold, and decode one stored sample."""
    from k5data.latents.plan import sample_id
    from k5data.latents.shards import read_index, read_tar

    prefix = str(meta["prefix"])
    index = read_index(store, prefix)
    ids = index.column("sample_id").to_pylist()
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


EDIT_PREFIX = "latents_edit"  # the editing pairs' shards (image VAE latent space, like image_latent_shards)


@dg.asset(deps=["edit_pairs", curated_dataset, "tiny_image_bundle"], group_name="latents",
          kinds={"pytorch", "parquet"}, owners=["team:k5-lifecycle"], op_tags=gpu_op_tags(1),
          description="Kept instruct-editing pairs of edit_pairs VAE-encoded (image VAE) into tar shards: the target's "
          "latent, the source's latent as the condition, the instruction as caption, the source image for the Qwen "
          "edit prompt and the target's description for the 20 % T2I; what the Image Editing stages train on.")
def edit_latent_shards(context: dg.AssetExecutionContext, config: LatentShardsConfig, curation: CurationResource,
                       object_store: ObjectStoreResource) -> dg.MaterializeResult:
    from k5data.editing.pairs import read_edit_pairs
    from k5data.latents.edit import encode_edit_pairs
    from k5data.latents.encode import LatentEncoders
    from k5data.latents.shards import index_uri
    from k5data.leases import LeaseHeld

    cfg = _latent_config(config)
    image_vae = config.image_vae or str(upstream_path(context, "tiny_image_bundle"))
    store, prefix = object_store.store(), (config.prefix or EDIT_PREFIX).strip("/")
    pairs = read_edit_pairs(store, str(latest_metadata(context, "edit_pairs")["path"]))
    try:
        summary = encode_edit_pairs(pairs, _curated_rows(context, curation, ("image",)), store, prefix,
                                    LatentEncoders.from_pretrained(None, image_vae, cfg),
                                    cfg, curation.config().endpoint_url,
                                    holder=f"Dagster run {context.run_id} (edit_latent_shards)")
    except LeaseHeld as err:
        raise dg.Failure(str(err)) from None
    return dg.MaterializeResult(metadata={
        "prefix": prefix, "index_uri": index_uri(store, prefix), "pairs": summary["pairs"],
        "pairs_kept": summary["pairs_kept"], "samples": summary["index_samples"], "encoded": summary["encoded"],
        "already_encoded": summary["already_encoded"], "skipped": dg.MetadataValue.json(summary["skipped"]),
        "seconds": summary["seconds"], "image_vae": image_vae, "dataset_snapshot": dataset_snapshot(context),
        **index_summary(store, prefix)})


latent_assets = [build_latent_asset(name, spec) for name, spec in LATENT_SETS.items()]
latent_checks = [build_latent_check(name, spec) for name, spec in LATENT_SETS.items()]

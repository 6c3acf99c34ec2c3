"""``k5 latents DATASET STORE``: VAE-encode the passed rows of a curated dataset into latent tar shards.

Also runnable as ``python -m k5cli.latents``. Imports only click at load time (``k5 --help`` stays fast)."""

from __future__ import annotations

import json

import click


def _per_shard(text: str | None) -> dict[tuple[str, str], int] | None:
    """``image/low=1024,video/high=1`` -> overrides of the report's samples per archive."""
    if not text:
        return None
    from k5data.latents.shards import SAMPLES_PER_SHARD

    out = dict(SAMPLES_PER_SHARD)
    for item in text.split(","):
        try:
            key, value = item.split("=")
            mod, res = key.strip().split("/")
            n = int(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: use MODALITY/CLASS=N, e.g. video/low=16",
                                     param_hint="--per-shard") from None
        if (mod, res) not in out or n < 1:
            raise click.BadParameter(f"{item!r}: key must be one of {sorted('/'.join(k) for k in out)} and N >= 1",
                                     param_hint="--per-shard")
        out[(mod, res)] = n
    return out


@click.command("latents")
@click.argument("dataset")
@click.argument("store")
@click.option("--prefix", default="latents", show_default=True, help="Key prefix of the shards inside STORE.")
@click.option("--video-vae", required=True, help="HunyuanVideo VAE folder or a pipeline folder (its vae/).")
@click.option("--image-vae", default=None,
              help="FLUX VAE folder or a T2I pipeline folder; unset: images are 1-frame videos of --video-vae.")
@click.option("--demo", is_flag=True, help="CPU demo sizes: buckets / 8, 2 s clips at 12 fps.")
@click.option("--fps", type=float, default=None, help="Target frame rate (default 24; demo 12).")
@click.option("--max-seconds", type=float, default=None, help="Longest clip (default 5; demo 2).")
@click.option("--scale", type=float, default=None, help="Bucket scale in (0, 1] (default 1; demo 1/8).")
@click.option("--classes", default=None, help="Area classes to encode at, e.g. low,medium (default all).")
@click.option("--per-shard", default=None, help="Samples per archive overrides, e.g. image/low=64,video/low=4.")
@click.option("--batch", type=int, default=None, help="Images per VAE batch (videos: --video-batch).")
@click.option("--video-batch", type=int, default=None, help="Clips per VAE batch.")
@click.option("--spill-every", type=int, default=None,
              help="Encoded samples per class held only in memory before they are saved to pending/ (a kill loses "
              "at most this many; default 32).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--vae-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--latent-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the VAE encoders.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// DATASET/STORE/media.")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def latents(dataset: str, store: str, prefix: str, video_vae: str, image_vae: str | None, demo: bool,
            fps: float | None, max_seconds: float | None, scale: float | None, classes: str | None,
            per_shard: str | None, batch: int | None, video_batch: int | None, spill_every: int | None, device: str,
            vae_dtype: str,
            latent_dtype: str, compile_: bool, endpoint_url: str | None, no_progress: bool, as_json: bool) -> None:
    """Encode DATASET (a `k5 curate` output folder or s3:// prefix) into latent shards in STORE (folder or
    s3://bucket/prefix). Re-running resumes: samples already in the shard index are skipped. One run writes a
    prefix at a time: a second one is refused, naming the first."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k5data.latents.encode import LatentConfig, LatentEncoders, encode_dataset, read_curated
    from k5data.latents.shards import IndexConflict
    from k5data.leases import LeaseHeld, LeaseLost
    from k5data.object_store import open_store

    overrides = {k: v for k, v in {"fps": fps, "max_seconds": max_seconds, "scale": scale, "image_batch": batch,
                                   "video_batch": video_batch, "spill_every": spill_every}.items()
                 if v is not None}
    if classes:
        overrides["classes"] = tuple(c.strip() for c in classes.split(",") if c.strip())
    overrides.update(device=device, vae_dtype=vae_dtype, latent_dtype=latent_dtype, compile=compile_,
                     per_shard=_per_shard(per_shard), progress=not no_progress)
    try:
        cfg = LatentConfig.demo(**overrides) if demo else LatentConfig(**overrides)
        df = read_curated(dataset, endpoint_url)
        encoders = LatentEncoders.from_pretrained(video_vae, image_vae, cfg)
        summary = encode_dataset(df, open_store(store, endpoint_url), prefix.strip("/"), encoders, cfg,
                                 endpoint_url, holder=f"k5 latents {dataset} -> {store}")
    except (ValueError, FileNotFoundError, LeaseHeld, LeaseLost, IndexConflict) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"encoded {summary['encoded']} samples ({summary['already_encoded']} already in the index, "
               f"{len(summary['skipped'])} skipped) into {summary['shards_written']} new shards in "
               f"{summary['seconds']:.1f} s ({summary['samples_per_s']:.2f} samples/s, VAE "
               f"{summary['frames_per_s_encode']:.1f} frames/s)")
    if summary["recovered_pending"]:
        click.echo(f"took back {summary['recovered_pending']} samples a killed run had encoded (pending/)")
    if summary["took_over_lease_of"]:
        click.echo(f"took over the stale lease of {summary['took_over_lease_of']}")
    click.echo(f"index: {summary['index_samples']} samples in {summary['index_shards']} shards at "
               f"{store.rstrip('/')}/{prefix.strip('/')}/index.json")
    for sid, reason in summary["skipped"].items():
        click.echo(f"skipped {sid}: {reason}")


if __name__ == "__main__":
    latents()

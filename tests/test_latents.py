"""Latent pre-encoding (k5data.latents.encode): bucket/crop/frame rules, tiling plans, encode -> shard -> stream round
trips on a local folder and a real HTTP S3 endpoint (moto), a SIGKILLed `k5 latents` run resumed, the Dagster asset and
its check, the object store resource on S3, and a short training run from the shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from helpers import moto_s3_server
from PIL import Image

from k5data.latents.buckets import BUCKETS, choose_bucket
from k5data.latents.encode import LatentConfig, LatentEncoders, encode_dataset, iter_latent_samples, read_curated
from k5data.latents.media import resize_cover_crop
from k5data.latents.plan import clip_frames, plan_jobs
from k5data.latents.shards import read_index, read_tar
from k5data.latents.tiling import TilePlan, tile_plan
from k5data.loading.loader import PackedLatentLoader
from k5data.object_store import LocalStore, S3Store, open_store

REPO = Path(__file__).resolve().parents[1]
SMALL = {(m, r): 1 for m in ("image", "video") for r in ("low", "medium", "high")}  # one sample per archive
CFG = LatentConfig.demo(max_seconds=1.0, progress=False)  # buckets / 8, <= 13 frames at 12 fps


# --------------------------------------------------------------------------------------------------------------------
# a tiny curated dataset: real image/video files + the Parquet rows `k5 curate` would write for them


def _video(path: Path, frames: int, h: int, w: int, seed: int) -> None:
    from k5data.curation.corpus import write_video

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    write_video(path, [np.roll(base, 4 * i, axis=1) for i in range(frames)], 25)


def _image(path: Path, h: int, w: int, seed: int) -> None:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, seed * 40 % 255)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _row(media: Path, kind: str, scene: int, h: int, w: int, bucket: int, *, start: float | None = None,
         end: float | None = None, passed: bool = True, **extra: object) -> dict:
    return {"media_id": f"m{zlib.crc32(media.name.encode()):08x}", "source_uri": media.as_uri(), "source": "t",
            "kind": kind, "scene_index": scene, "start_s": start, "end_s": end, "width": w, "height": h,
            "fps": 25.0 if kind == "video" else None, "bucket": bucket, "caption": f"a {kind} of {media.stem}",
            "quality_aesthetic": 0.5 + scene / 10, "dynamics_score": 0.3, "domain": "nature", "cluster": 1,
            "passed": passed, **extra}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curated")
    media = root / "media"
    media.mkdir()
    _video(media / "walk.mp4", 40, 256, 384, 0)
    _image(media / "wide.png", 256, 384, 1)
    _image(media / "tall.png", 384, 256, 2)
    _image(media / "square.png", 520, 520, 3)
    _image(media / "edit_src.png", 256, 400, 4)
    _image(media / "edit_dst.png", 256, 400, 5)
    _image(media / "bad.png", 256, 256, 6)
    rows = [
        _row(media / "walk.mp4", "video", 0, 256, 384, 256, start=0.0, end=1.6),  # 13 frames at 12 fps
        _row(media / "walk.mp4", "video", 1, 256, 384, 256, start=0.8, end=1.6),  # 9 frames
        _row(media / "wide.png", "image", 0, 256, 384, 256),
        _row(media / "tall.png", "image", 0, 384, 256, 256),
        _row(media / "square.png", "image", 0, 520, 520, 512),  # medium class
        _row(media / "edit_dst.png", "image", 0, 256, 400, 256, edit_source_uri=(media / "edit_src.png").as_uri()),
        _row(media / "bad.png", "image", 0, 256, 256, 256, passed=False),
    ]
    part = root / "dataset" / "256" / "t"
    part.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(part / "part-00000.parquet")
    return root


@pytest.fixture(scope="module")
def encoders(tiny_t2v_dir: Path, tiny_t2i_dir: Path) -> LatentEncoders:
    return LatentEncoders.from_pretrained(tiny_t2v_dir, tiny_t2i_dir, CFG)


@pytest.fixture(scope="module")
def reference(dataset: Path, encoders: LatentEncoders) -> dict:
    """Every sample encoded once in memory: what any store must give back bit for bit."""
    jobs, skipped = plan_jobs(read_curated(str(dataset)), CFG)
    assert not skipped
    return {s.id: s for s in iter_latent_samples(jobs, encoders, CFG)}


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)


# --------------------------------------------------------------------------------------------------------------------
# rules


def test_buckets_crop_frames_and_tile_plans(tiny_t2v_dir: Path) -> None:
    # report Table 2 (Lite / Pro) and Table 4 buckets, all multiples of the 16-px latent patch
    assert BUCKETS[("video", "medium")] == [(512, 512), (512, 768), (768, 512)]
    assert (1408, 640) in BUCKETS[("video", "high")] and (256, 384) in BUCKETS[("video", "low")]
    assert all(h % 16 == 0 and w % 16 == 0 for sizes in BUCKETS.values() for h, w in sizes)
    assert choose_bucket(272, 640, "video", "low") == (256, 384)  # 2.35:1 -> widest low-res video bucket
    assert choose_bucket(300, 200, "image", "low") == (320, 192)  # portrait 2:3 -> nearest log aspect 0.6
    assert choose_bucket(720, 1280, "video", "medium") == (512, 768)
    with pytest.raises(ValueError, match="0x10"):
        choose_bucket(0, 10, "image", "low")

    # cover + centre crop: the left (red) and right (blue) halves stay left and right, nothing is stretched
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100, 0] = 255
    img[:, 100:, 2] = 255
    out = resize_cover_crop(img, 64, 64)
    assert out.shape == (64, 64, 3)
    assert out[:, :30, 0].min() > 200 and out[:, 34:, 2].min() > 200  # the 64x128 cover keeps its centre

    # scene 3.04..5.48 s at 25 fps resampled to 24 fps: 58 frames fit -> 57 (4k+1), strictly inside the scene
    idx = clip_frames(3.04, 5.48, 25.0, 24.0, 5.0)
    assert len(idx) == 57 and idx[0] == 76 and idx[-1] < 137 and all(b > a for a, b in zip(idx, idx[1:]))
    assert len(clip_frames(0.0, 60.0, 25.0, 24.0, 5.0)) == 121  # 5 s at 24 fps
    assert clip_frames(0.0, 0.01, 25.0, 24.0, 5.0) == []
    with pytest.raises(ValueError, match="fps"):
        clip_frames(0.0, 1.0, float("nan"), 24.0, 5.0)

    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo.from_pretrained(tiny_t2v_dir / "vae")
    tile_plan(1280, 768).apply(vae, 1280, 768)  # Pro size: 2 tiles along the long side instead of diffusers' 28
    assert vae.use_tiling and (vae.tile_sample_stride_height, vae.tile_sample_min_height) == (640, 704)
    assert (vae.tile_sample_stride_width, vae.tile_sample_min_width) == (768, 768)
    assert tile_plan(512, 768).chunk_frames == 16 and tile_plan(640, 640).chunk_frames == 16  # Lite: causal chunks
    TilePlan(1, 1, 16, 12).apply(vae, 512, 768)  # whole frames, diffusers' 16-frame temporal tiles
    assert not vae.use_tiling and vae.tile_sample_min_num_frames == 16
    tile_plan(256, 384).apply(vae, 256, 384)  # low res: the whole clip at once (fastest on an H100, and exact)
    assert not vae.use_tiling and not vae.use_framewise_encoding and tile_plan(32, 48).frames is None
    with pytest.raises(ValueError, match="tile plan"):
        TilePlan(frames=10)
    with pytest.raises(ValueError, match="whole frames"):
        TilePlan(2, 1, chunk_frames=8)
    with pytest.raises(ValueError, match="multiple of 4"):
        TilePlan(chunk_frames=6)

    # a plan that really tiles (2x2 spatial, 4-frame temporal tiles) still encodes to the untiled latent shape
    import torch

    from k5model.encoders.vae import VideoVAE

    wrapped = VideoVAE(vae)
    TilePlan(2, 2, frames=4, frames_stride=4, overlap=16).apply(vae, 64, 64)
    z = wrapped.encode(torch.rand(1, 3, 9, 64, 64) * 2 - 1)
    assert z.shape == (1, 3, 8, 8, 16) and torch.isfinite(z).all()


def test_video_plans_switch_between_chunked_and_diffusers_encoding(tiny_t2v_dir: Path) -> None:
    import torch

    from k5model.encoders.vae import VideoVAE

    video = VideoVAE.from_pretrained(tiny_t2v_dir, tiling=False)
    x = torch.rand(1, 3, 17, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    TilePlan(frames=None).configure(video, 64, 64)  # diffusers, the whole clip at once: exact
    whole = video.encode(x)
    TilePlan(chunk_frames=16).configure(video, 64, 64)  # one chunk holds all 17 frames: the same encode
    chunked = video.chunked
    assert chunked is not None and chunked.chunk == 16
    assert torch.allclose(video.encode(x), whole, atol=1e-5)
    assert video.vae.encoder.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    TilePlan(chunk_frames=16).configure(video, 64, 64)
    assert video.chunked is chunked  # same plan again: the encoder is kept
    TilePlan(chunk_frames=4).configure(video, 64, 64)
    short = video.encode(x)
    assert video.chunked.chunk == 4 and short.shape == whole.shape
    assert 0 < (short - whole).abs().max() < 0.5 * whole.abs().max()  # per-chunk GroupNorm: close, not equal
    TilePlan(frames=None).configure(video, 64, 64)  # back to diffusers: contiguous weights, the same latents
    assert video.chunked is None and video.vae.encoder.conv_in.conv.weight.is_contiguous()
    assert torch.equal(video.encode(x), whole)


# --------------------------------------------------------------------------------------------------------------------
# round trips


def _check_stream(store: LocalStore | S3Store, reference: dict, media_moved: bool = False) -> None:
    index = read_index(store, "lat")
    ids = index.column("sample_id").to_pylist()
    assert sorted(ids) == sorted(reference)  # every passed row exactly once; the rejected row is absent
    seen = {}
    for b in PackedLatentLoader(store, "lat", t_max=8, image_step_fraction=0.5, seed=0):
        for lat, sid, cap, fps, src in zip(b.latents, b.ids, b.captions, b.fps, b.source_latents):
            ref = reference[sid]
            assert lat.dtype == ref.latent.dtype and lat.shape == ref.latent.shape
            assert lat.tobytes() == ref.latent.tobytes(), sid  # bit-identical
            assert (cap, fps) == (ref.caption, ref.fps)
            assert (src is None) == (ref.source_latent is None)
            if src is not None:
                assert src.tobytes() == ref.source_latent.tobytes()
            seen[sid] = seen.get(sid, 0) + 1
    assert seen == {sid: 1 for sid in reference}
    for shard in sorted(set(index.column("shard").to_pylist())):  # metadata travels with the latents
        with store.open_read(f"lat/{shard}") as f:
            for s in read_tar(f):
                ref = reference[s.id]
                meta = {**s.meta, "source_uri": ref.meta["source_uri"]} if media_moved else s.meta
                assert (s.scores, meta, s.res_class) == (ref.scores, ref.meta, ref.res_class)


def test_round_trip_local(dataset: Path, encoders: LatentEncoders, reference: dict, tmp_path: Path) -> None:
    by_kind = {s.meta["kind"]: s for s in reference.values()}
    video = next(s for s in reference.values() if s.meta["kind"] == "video" and s.meta["scene_index"] == 0)
    assert video.latent.shape == (4, 4, 6, 16) and video.fps == 12.0  # 13 frames of 32x48 px
    assert video.meta["vae"] == "hunyuan_video" and by_kind["image"].meta["vae"] == "flux"
    square = next(s for s in reference.values() if s.meta["width"] == 520)
    assert square.res_class == "medium" and square.latent.shape == (1, 8, 8, 16)  # 512x512 / 8 = 64 px
    edit = next(s for s in reference.values() if s.source_latent is not None)
    assert edit.source_latent.shape == edit.latent.shape and not np.array_equal(edit.source_latent, edit.latent)

    store = LocalStore(tmp_path)
    summary = encode_dataset(read_curated(str(dataset)), store, "lat", encoders, CFG)
    assert (summary["passed_rows"], summary["encoded"], summary["index_samples"]) == (6, 6, 6)
    _check_stream(store, reference)
    again = encode_dataset(read_curated(str(dataset)), store, "lat", encoders, CFG)
    assert (again["encoded"], again["already_encoded"], again["shards_written"]) == (0, 6, 0)  # idempotent


def test_round_trip_s3_media_dataset_and_shards(dataset: Path, encoders: LatentEncoders, reference: dict,
                                                s3: str, aws_env: None) -> None:
    import boto3

    from orchestration.resources import ObjectStoreResource

    client = boto3.client("s3", endpoint_url=s3)
    client.create_bucket(Bucket="k5lat")
    df = read_curated(str(dataset))
    for col in ("source_uri", "edit_source_uri"):  # media on S3 too
        for uri in df[col].dropna().unique():
            path = Path(uri.removeprefix("file://"))
            client.upload_file(str(path), "k5lat", f"media/{path.name}")
        df[col] = df[col].map(lambda u: f"s3://k5lat/media/{Path(u).name}" if isinstance(u, str) else u)
    client.put_object(Bucket="k5lat", Key="cur/dataset/256/t/part-00000.parquet", Body=df.to_parquet())

    store = open_store("s3://k5lat/root", endpoint_url=s3)
    assert isinstance(store, S3Store)
    summary = encode_dataset(read_curated("s3://k5lat/cur", s3), store, "lat", encoders, CFG, endpoint_url=s3)
    assert summary["encoded"] == 6
    _check_stream(store, reference, media_moved=True)  # same bits as the local-media encode

    # the Dagster object store resource serves the same S3 store
    res = ObjectStoreResource(base_uri="s3://k5lat/root", endpoint_url=s3)
    assert res.exists("lat/index.json") and res.uri("lat/index.json") == "s3://k5lat/root/lat/index.json"
    assert res.put_file(dataset / "media" / "wide.png", "x/wide.png") == "s3://k5lat/root/x/wide.png"
    back = res.get_file("x/wide.png", dataset / "back.png")
    assert back.read_bytes() == (dataset / "media" / "wide.png").read_bytes()
    with pytest.raises(FileNotFoundError, match="missing"):
        res.get_file("missing", dataset / "m.png")


# --------------------------------------------------------------------------------------------------------------------
# a killed `k5 latents` run, resumed


def test_sigkilled_packing_run_resumes_without_duplicates(dataset: Path, tiny_t2v_dir: Path, tmp_path: Path) -> None:
    from k5cli.main import main as k5

    assert "latents" in k5.commands
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "k5cli.latents", str(dataset), str(out), "--prefix", "lat", "--video-vae",
           str(tiny_t2v_dir), "--demo", "--max-seconds", "1", "--no-progress", "--per-shard",
           ",".join(f"{m}/{r}=1" for m, r in SMALL)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "K5_LATENTS_SLEEP_S": "0.4"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    store = LocalStore(out)
    deadline = time.monotonic() + 60
    try:
        while read_index(store, "lat").num_rows < 2:  # two archives listed: kill between shards
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard listed within 60 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    listed = read_index(store, "lat").num_rows
    assert 2 <= listed < 6  # killed mid-way

    env.pop("K5_LATENTS_SLEEP_S")
    done = subprocess.run([*cmd, "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["already_encoded"] == listed and summary["encoded"] == 6 - listed
    index = read_index(store, "lat")
    ids = index.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == 6  # no duplicates, none missing
    in_archives = []
    for shard in sorted(set(index.column("shard").to_pylist())):  # every listed archive is complete
        with store.open_read(f"lat/{shard}") as f:
            in_archives += [s.id for s in read_tar(f)]
    assert sorted(in_archives) == sorted(ids)


# --------------------------------------------------------------------------------------------------------------------
# Dagster asset + check


def test_latent_shards_asset_and_check(dataset: Path, tiny_t2v_dir: Path, tmp_path: Path) -> None:
    from assets.curation import curated_dataset
    from assets.latents import latent_assets, latent_checks
    from assets.models import tiny_model_bundle

    latent_shards, latent_index_complete = latent_assets[0], latent_checks[0]
    from orchestration.resources import CurationResource, K5HomeResource, ObjectStoreResource

    resources = {"curation": CurationResource(), "object_store": ObjectStoreResource(base_uri=str(tmp_path / "obj")),
                 "k5_home": K5HomeResource(home=str(tmp_path / "home"))}
    with dg.instance_for_test() as instance:
        for key, path in ((curated_dataset.key, dataset), (tiny_model_bundle.key, tiny_t2v_dir)):
            instance.report_runless_asset_event(dg.AssetMaterialization(key, metadata={"path": str(path)}))
        everything = [curated_dataset, tiny_model_bundle, latent_shards, latent_index_complete]
        sel = dg.AssetSelection.assets(latent_shards) | dg.AssetSelection.checks(latent_index_complete)
        first = dg.materialize(everything, selection=sel, resources=resources, instance=instance)
        meta = {k: v.value for k, v in first.asset_materializations_for_node("latent_shards")[0].metadata.items()}
        assert (meta["samples"], meta["encoded"], meta["skipped"]) == (6, 6, {})
        [check] = first.get_asset_check_evaluations()
        assert check.passed and check.metadata["indexed"].value == 6 and check.metadata["decoded_sample"].value
        second = dg.materialize(everything, selection=sel, resources=resources, instance=instance)
        meta2 = second.asset_materializations_for_node("latent_shards")[0].metadata
        assert (meta2["encoded"].value, meta2["already_encoded"].value) == (0, 6)  # re-run: nothing re-encoded

        # an archive lost from the store fails the check, naming it
        shard = sorted(read_index(LocalStore(tmp_path / "obj"), "latents").column("shard").to_pylist())[0]
        (tmp_path / "obj" / "latents" / shard).unlink()
        broken = dg.materialize(everything, selection=dg.AssetSelection.checks(latent_index_complete),
                                resources=resources, instance=instance, raise_on_error=False)
        [check] = broken.get_asset_check_evaluations()
        assert not check.passed and "listed archives missing" in check.description


def test_image_latent_set_encodes_images_through_the_image_vae(dataset: Path, tiny_t2v_dir: Path, tiny_t2i_dir: Path,
                                                                tmp_path: Path) -> None:
    from assets.curation import curated_dataset
    from assets.latents import latent_assets, latent_checks
    from orchestration.resources import CurationResource, K5HomeResource, ObjectStoreResource

    image_set, image_check = latent_assets[1], latent_checks[1]
    assert image_set.key.to_user_string() == "image_latent_shards"
    resources = {"curation": CurationResource(), "object_store": ObjectStoreResource(base_uri=str(tmp_path / "obj")),
                 "k5_home": K5HomeResource(home=str(tmp_path / "home"))}
    df = read_curated(str(dataset))
    images = int((df["passed"].fillna(False).astype(bool) & (df["kind"] == "image")).sum())
    with dg.instance_for_test() as instance:
        for key, path in ((curated_dataset.key, dataset), ("tiny_model_bundle", tiny_t2v_dir),
                          ("tiny_image_bundle", tiny_t2i_dir)):
            instance.report_runless_asset_event(dg.AssetMaterialization(key, metadata={"path": str(path)}))
        result = dg.materialize([image_set, image_check], resources=resources, instance=instance)
        meta = result.asset_materializations_for_node("image_latent_shards")[0].metadata
        meta = {k: v.value for k, v in meta.items()}
        assert meta["samples"] == images and meta["prefix"] == "latents_image" and meta["kinds"] == "image"
        assert meta["image_vae"] == str(tiny_t2i_dir)
        [check] = result.get_asset_check_evaluations()
        assert check.passed and check.metadata["expected"].value == images
    index = read_index(LocalStore(tmp_path / "obj"), "latents_image")
    assert set(index.column("modality").to_pylist()) == {"image"}
    first = sorted(set(index.column("shard").to_pylist()))[0]
    with LocalStore(tmp_path / "obj").open_read(f"latents_image/{first}") as f:
        assert next(read_tar(f)).meta["vae"] == "flux"  # decoded by the check with the image VAE


# --------------------------------------------------------------------------------------------------------------------
# training from the shards


def test_short_training_run_from_shards(dataset: Path, encoders: LatentEncoders, tiny_t2v_dir: Path,
                                        tmp_path: Path) -> None:
    store = tmp_path / "store"
    encode_dataset(read_curated(str(dataset)), LocalStore(store), "lat", encoders, CFG)
    cmd = [sys.executable, "-m", "k5cli.train_run", "--stage", "tiny_demo", "--out", str(tmp_path / "run"),
           "--steps", "3", "--shards", "lat", "--store", str(store), "--text-encoders", str(tiny_t2v_dir),
           "--t-max", "8", "--no-export", "--ckpt-every", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"step"')]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(np.isfinite(s["loss"]) and s["tokens"] > 0 for s in steps)


def test_run_shards_needs_store_and_text_encoders() -> None:
    import click

    from k5cli.train_run import main

    with pytest.raises(click.UsageError, match="shards needs store"):
        main.main(["--stage", "tiny_demo", "--out", "unused", "--shards", "lat"], standalone_mode=False)

"""Latent shards + packed loader: round trip, crash-resume (local + moto S3), exact loader resume."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pytest
from helpers import moto_s3_server

from k5data.latents.shards import LatentSample, read_index, write_shards
from k5data.loading.loader import PackedLatentLoader
from k5data.object_store import LocalStore, S3Store

SMALL = {(m, r): n for m, ns in (("image", (8, 4, 2)), ("video", (3, 2, 1)))
         for r, n in zip(("low", "medium", "high"), ns)}


def make_samples(n: int = 60, seed: int = 0) -> list[LatentSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = 1 if i % 3 == 0 else int(rng.integers(2, 9))
        h, w = [(4, 6), (6, 4), (5, 5)][i % 3 if t > 1 else int(rng.integers(0, 3))]
        lat = rng.standard_normal((t, h, w, 16)).astype(np.float32)
        out.append(LatentSample(f"s{i:04d}", lat, f"caption {i}", float(rng.choice([24, 30])),
                                ["low", "medium", "high"][i % 4 % 3], {"aesthetic": float(rng.random())}))
    return out


def drain(loader: PackedLatentLoader) -> list[list[str]]:
    return [b.ids for b in loader]


def check_round_trip(store: LocalStore | S3Store, samples: list[LatentSample]) -> None:
    idx = read_index(store, "ds")
    ids = idx.column("sample_id").to_pylist()
    assert sorted(ids) == sorted(s.id for s in samples)  # no duplicates, none missing
    by_id = {s.id: s for s in samples}
    seen = 0
    for b in PackedLatentLoader(store, "ds", t_max=12, image_step_fraction=0.3, seed=1):
        for lat, sid, cap, fps in zip(b.latents, b.ids, b.captions, b.fps):
            ref = by_id[sid]
            assert lat.dtype == ref.latent.dtype and lat.tobytes() == ref.latent.tobytes()
            assert (cap, fps) == (ref.caption, ref.fps)
            seen += 1
    assert seen == len(samples)


def test_round_trip_and_crash_resume_local(tmp_path: Path) -> None:
    samples = make_samples()
    store = LocalStore(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(samples, store, "ds", per_shard=SMALL, fail_after=4)
    assert len(set(read_index(store, "ds").column("shard").to_pylist())) == 4
    write_shards(samples, store, "ds", per_shard=SMALL)
    assert write_shards(samples, store, "ds", per_shard=SMALL) == 0  # idempotent
    check_round_trip(store, samples)
    assert any(k.startswith("ds/shards/video/high/shard-000000-") for k in store.list("ds/"))


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


def test_crash_resume_s3(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="lat")
    store = S3Store("lat", "root", endpoint_url=s3, multipart_threshold=5 * 1024 * 1024)
    samples = make_samples(40, seed=3)
    samples.append(LatentSample("big", np.random.default_rng(9).standard_normal((40, 96, 96, 16)).astype(np.float32),
                                "big", 24.0, "high"))  # ~23 MB -> multipart upload with SHA256 checksums
    with pytest.raises(RuntimeError):
        write_shards(samples, store, "ds", per_shard=SMALL, fail_after=3)
    write_shards(samples, store, "ds", per_shard=SMALL)
    check_round_trip(store, samples)
    big_shard = read_index(store, "ds").filter(pa.compute.equal(read_index(store, "ds")["sample_id"], "big"))
    head = boto3.client("s3", endpoint_url=s3).head_object(Bucket="lat", Key="root/ds/" + big_shard["shard"][0].as_py())
    assert "-" in head["ETag"]  # multipart upload


def test_loader_invariants_and_exact_resume(tmp_path: Path) -> None:
    samples = make_samples(90, seed=5)
    store = LocalStore(tmp_path)
    write_shards(samples, store, "ds", per_shard=SMALL)
    full = list(PackedLatentLoader(store, "ds", t_max=12, image_step_fraction=0.3, seed=7))
    assert full and any(b.is_image for b in full) and any(not b.is_image for b in full)
    for b in full:
        kinds = {lat.shape[0] == 1 for lat in b.latents}
        assert kinds == {b.is_image}  # images never mixed with videos
        assert len({lat.shape[1:3] for lat in b.latents}) == 1  # one aspect ratio per batch
        assert sum(lat.shape[0] for lat in b.latents) <= 12 or len(b.latents) == 1
    ids_full = [b.ids for b in full]
    assert ids_full == drain(PackedLatentLoader(store, "ds", t_max=12, image_step_fraction=0.3, seed=7))
    for cut in (1, 5, len(ids_full) // 2):
        a = PackedLatentLoader(store, "ds", t_max=12, image_step_fraction=0.3, seed=7)
        head = [next(a).ids for _ in range(cut)]
        b = PackedLatentLoader(store, "ds", t_max=12, image_step_fraction=0.3, seed=7)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # state survives a JSON checkpoint
        assert head + drain(b) == ids_full

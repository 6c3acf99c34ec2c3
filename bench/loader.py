"""Loader bench: padding waste of packed vs one-video-per-sample batching, and samples/s from local vs S3 stores.

    python -m bench.loader            # 3,000 synthetic samples
    python -m bench.loader --smoke    # 300; for CI
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import moto_s3_server
from k5data.latents.shards import LatentSample, write_shards
from k5data.loading.loader import PackedLatentLoader
from k5data.object_store import LocalStore, S3Store


def synth(n: int, seed: int = 0) -> list[LatentSample]:
    # why: length distribution skewed to short clips (report Fig. 16b), lengths in latent frames
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(np.clip(rng.exponential(6.0) + 2, 2, 31))
        out.append(LatentSample(f"v{i:05d}", rng.standard_normal((t, 4, 6, 16)).astype(np.float16), "", 24.0, "low"))
    return out


def run(store: LocalStore | S3Store, t_max: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    real = n = batches = 0
    for b in PackedLatentLoader(store, "ds", t_max=t_max, image_step_fraction=0.0, seed=0):
        real += sum(lat.shape[0] for lat in b.latents)
        n += len(b.latents)
        batches += 1
    dt = time.perf_counter() - t0
    return real / (batches * t_max), n / dt, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--t-max", type=int, default=64)
    a = ap.parse_args()
    samples = synth(300 if a.smoke else 3000)
    lengths = np.array([s.latent.shape[0] for s in samples])
    # one video per sample padded to the longest clip of a batch of 8 (standard padding baseline)
    pad = sum(c.sum() / (len(c) * c.max()) * len(c) for c in np.array_split(lengths, len(lengths) // 8)) / len(lengths)
    print(f"one-video-per-sample batches: {100 * pad:.1f}% real tokens")
    with tempfile.TemporaryDirectory() as td:
        local = LocalStore(Path(td))
        write_shards(samples, local, "ds")
        frac, sps, n = run(local, a.t_max)
        print(f"packed (t_max={a.t_max}): {100 * frac:.1f}% real tokens; local store {sps:.0f} samples/s ({n})")
        import boto3

        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(k, "x")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        with moto_s3_server() as url:
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
            s3 = S3Store("bench", "p", endpoint_url=url)
            write_shards(samples, s3, "ds")
            _, sps3, _ = run(s3, a.t_max)
            print(f"moto S3 store {sps3:.0f} samples/s")


if __name__ == "__main__":
    main()

"""Overlapped I/O (issue 19): the latent archives are read and unpacked in a worker process (``ArchivePrefetcher``)
with a bounded queue. The prefetched loader yields exactly the inline loader's batches (local store and moto's S3
server), its state records only what was taken — the same state as the inline loader's although the worker has read
ahead — and a resumed loader (prefetched or not) continues exactly; worker failures surface in the training process.
The trainer's data source (``ShardLatentSource(prefetch=N)``) gives the same batches and resumes exactly; the bench's
CPU smoke mode runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import moto_s3_server

from k5data.latents.shards import LatentSample, read_index, write_shards
from k5data.loading.loader import ArchivePrefetcher, PackedLatentLoader
from k5data.loading.training_source import ShardLatentSource, TextEncoders
from k5data.object_store import LocalStore, S3Store
from k5model.training.config import StageConfig

REPO = Path(__file__).resolve().parents[1]
PER_SHARD = {(m, r): n for m, ns in (("image", (10, 10, 10)), ("video", (6, 6, 6)))
             for r, n in zip(("low", "medium", "high"), ns)}
LOADER = dict(t_max=12, image_step_fraction=0.3, seed=7, queue_factor=1.0)


def _samples(n: int = 150, seed: int = 5) -> list[LatentSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = 1 if i % 3 == 0 else int(rng.integers(2, 9))
        h, w = [(4, 6), (6, 4), (5, 5)][i % 3 if t > 1 else int(rng.integers(0, 3))]
        out.append(LatentSample(f"s{i:04d}", rng.standard_normal((t, h, w, 16)).astype(np.float32), f"caption {i}",
                                24.0, ["low", "medium", "high"][i % 4 % 3]))
    return out


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    store = LocalStore(tmp_path_factory.mktemp("overlap"))
    write_shards(_samples(), store, "ds", per_shard=PER_SHARD)
    return store


@pytest.fixture(scope="module")
def prefetcher(local_store: LocalStore) -> Iterator[ArchivePrefetcher]:
    p = ArchivePrefetcher(local_store, depth=64)  # one worker for the module's loaders (each restarts it)
    yield p
    p.close()


def _ids(loader: PackedLatentLoader) -> list[list[str]]:
    return [b.ids for b in loader]


def test_prefetched_loader_equals_inline_and_resumes_exactly(local_store: LocalStore,
                                                              prefetcher: ArchivePrefetcher) -> None:
    inline = list(PackedLatentLoader(local_store, "ds", **LOADER))
    streamed = list(PackedLatentLoader(local_store, "ds", **LOADER, prefetcher=prefetcher))
    assert [b.ids for b in streamed] == [b.ids for b in inline] and len(inline) > 20
    assert all(x.tobytes() == y.tobytes() for a, b in zip(streamed, inline) for x, y in zip(a.latents, b.latents))
    full = [b.ids for b in inline]
    mid_archive = 0
    for cut in (1, 4, 9, len(full) // 2):
        ref = PackedLatentLoader(local_store, "ds", **LOADER)
        a = PackedLatentLoader(local_store, "ds", **LOADER, prefetcher=prefetcher)
        head = [next(a).ids for _ in range(cut)]
        [next(ref) for _ in range(cut)]
        deadline = time.monotonic() + 20
        while cut < 9 and prefetcher.ahead() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # let the worker read ahead of what the loader took
        ahead = prefetcher.ahead()
        state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
        # what the batches took (and the loader's queues hold), never what the worker read ahead
        assert state == json.loads(json.dumps(ref.state_dict())), (cut, ahead)
        if cut < 9:
            assert ahead > 0 and state["open"] and state["consumed"] > 0  # mid-archive, with read-ahead
            mid_archive += 1
        resumed = PackedLatentLoader(local_store, "ds", **LOADER, prefetcher=prefetcher)
        resumed.load_state_dict(state)
        assert head + _ids(resumed) == full, cut
        inline_resumed = PackedLatentLoader(local_store, "ds", **LOADER)  # the states are interchangeable
        inline_resumed.load_state_dict(state)
        assert head + _ids(inline_resumed) == full, cut
    assert mid_archive == 2


def test_worker_failure_is_raised_in_the_training_process(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    write_shards(_samples(40), store, "ds", per_shard=PER_SHARD)
    victim = sorted(set(read_index(store, "ds").column("shard").to_pylist()))[0]
    (tmp_path / "ds" / victim).unlink()
    with pytest.raises(FileNotFoundError):  # inline: the reader's own error
        list(PackedLatentLoader(store, "ds", **LOADER))
    p = ArchivePrefetcher(store, depth=4)
    try:
        with pytest.raises(RuntimeError, match=f"prefetch worker: FileNotFoundError.*{victim.rsplit('/', 1)[-1]}"):
            list(PackedLatentLoader(store, "ds", **LOADER, prefetcher=p))
        assert p._proc.is_alive()  # the worker survives a failed request ...
        os.kill(p._proc.pid, 9)  # ... but if it dies the loader says so instead of waiting forever
        p._proc.join(timeout=10)
        with pytest.raises(RuntimeError, match="prefetch worker died"):
            p.start("ds", [victim], 0, 0)
            p.next()
    finally:
        p.close()
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ArchivePrefetcher(store, depth=0)


@pytest.mark.slow
def test_prefetch_from_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)  # inherited by the spawned worker, which opens its own client
    import boto3

    with moto_s3_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lat")
        store = S3Store("lat", "root", endpoint_url=endpoint)
        write_shards(_samples(60, seed=2), store, "ds", per_shard=PER_SHARD)
        p = ArchivePrefetcher(store, depth=8)
        try:
            streamed = _ids(PackedLatentLoader(store, "ds", **LOADER, prefetcher=p))
        finally:
            p.close()
        assert streamed == _ids(PackedLatentLoader(store, "ds", **LOADER))


@pytest.fixture(scope="module")
def text(tiny_t2v_dir: Path) -> TextEncoders:
    return TextEncoders.from_pretrained(tiny_t2v_dir)


@pytest.mark.slow
def test_training_source_prefetched_equals_inline_and_resumes(one_thread, local_store: LocalStore,
                                                              text: TextEncoders) -> None:
    stage = StageConfig(name="overlap", steps=4, batch=2, lr=1e-3, tasks={"t2i": 0.3, "t2v": 0.7}, frames=4, seed=3)

    def source(prefetch: int) -> ShardLatentSource:
        return ShardLatentSource(local_store, "ds", stage, text, t_max=8, prefetch=prefetch)

    inline, streamed = source(0), source(16)
    try:
        ref = [next(inline) for _ in range(30)]  # several epochs of both streams
        got = [next(streamed) for _ in range(12)]
        state = json.loads(json.dumps(streamed.state_dict(), default=list))
        got += [next(streamed) for _ in range(18)]
        assert max(st.epoch for st in streamed.streams.values()) >= 1  # a new epoch restarted its worker
        for a, b in zip(got, ref):
            assert a.ids == b.ids and a.tasks == b.tasks
            assert all(torch.equal(x, y) for x, y in zip(a.x0, b.x0))
            assert all(torch.equal(x, y) for x, y in zip(a.text_embeds, b.text_embeds))
        resumed = source(16)
        resumed.load_state_dict(state)
        assert [next(resumed).ids for _ in range(18)] == [b.ids for b in ref[12:]]
        resumed.close()
    finally:
        streamed.close()


@pytest.mark.slow
def test_bench_smoke_streams_and_replays() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.loader_overlap", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "OUT": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    for mode in ("in_memory", "stream_prefetch", "stream_inline"):
        assert res[mode]["step_s"] > 0 and res[mode]["data_wait_s"] >= 0, res
    assert res["same_batches"] is True


def test_an_unclosed_prefetcher_never_holds_up_interpreter_exit(local_store: LocalStore) -> None:
    """A process that never closes its prefetcher, and whose SIGTERM is ignored (inherited by the spawned worker),
    still exits: the worker restores SIGTERM and does not wait to flush samples nobody will read. Before that,
    Python's exit-time join of daemon children waited forever on a worker blocked on a full queue."""
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "from k5data.latents.shards import read_index\n"
        "from k5data.loading.loader import ArchivePrefetcher\n"
        "from k5data.object_store import LocalStore\n"
        "store = LocalStore(sys.argv[1])\n"
        "archives = sorted(set(read_index(store, 'ds').column('shard').to_pylist()))\n"
        "p = ArchivePrefetcher(store, depth=2)\n"
        "p.start('ds', archives, 0, 0)\n"
        "index, sample = p.next()\n"
        "print('read', sample.id if sample is not None else index)\n"  # then exit with the worker's queue full
    )
    proc = subprocess.run([sys.executable, "-c", script, str(local_store.root)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.startswith("read "), proc.stderr[-2000:]

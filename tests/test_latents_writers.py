"""One writer at a time on a latents prefix (issue 20), on real stores (a folder, moto's S3 server over HTTP):
the lease (refusal naming the holder, takeover of expired / dead-pid leases, loss noticed), the versioned shard index
(readers see the old or the new version under concurrent publishes and an injected failure mid-write; a conflicting
publish is refused), two concurrent `k5 latents` runs, a SIGKILL costing at most the spill bound, vanished media and
broken model folders."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import moto_s3_server
from PIL import Image

from k5data.latents.shards import (
    IndexConflict,
    LatentSample,
    ShardWriter,
    publish_index,
    read_index,
    read_index_head,
    read_tar,
    write_shards,
)
from k5data.leases import (
    LeaseHeld,
    LeaseLost,
    LeaseRecord,
    acquire_lease,
    lease_key,
    put_if_absent,
    put_if_version,
    read_lease,
    read_versioned,
)
from k5data.object_store import LocalStore, S3Store

REPO = Path(__file__).resolve().parents[1]
ONE = {(m, r): 1 for m in ("image", "video") for r in ("low", "medium", "high")}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with moto_s3_server() as endpoint:
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="leases")
            yield endpoint
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStore | S3Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return S3Store("leases", f"t{time.monotonic_ns()}", endpoint_url=request.getfixturevalue("s3_endpoint"))


def latent_samples(n: int, seed: int = 0) -> list[LatentSample]:
    rng = np.random.default_rng(seed)
    return [LatentSample(f"s{i:03d}", rng.standard_normal((1 if i % 2 else 2, 4, 4, 16)).astype(np.float32),
                         f"caption {i}", 12.0, "low") for i in range(n)]


def archived_ids(store: LocalStore | S3Store, prefix: str) -> list[str]:
    """Every sample id inside the archives the index lists (an archive holding a sample twice would show)."""
    out = []
    for shard in sorted(set(read_index(store, prefix).column("shard").to_pylist())):
        with store.open_read(f"{prefix}/{shard}") as f:
            out += [s.id for s in read_tar(f)]
    return out


# --------------------------------------------------------------------------------------------------------------------
# conditional writes and the lease


def test_conditional_writes_decide_both_ways(store: LocalStore | S3Store) -> None:
    first = put_if_absent(store, "p/obj", b"one")
    assert first is not None and put_if_absent(store, "p/obj", b"two") is None  # exists: refused
    assert read_versioned(store, "p/obj").data == b"one"
    second = put_if_version(store, "p/obj", b"two", first)
    assert second is not None and second != first  # still at `first`: replaced
    assert put_if_version(store, "p/obj", b"three", first) is None  # moved on since: refused
    assert read_versioned(store, "p/obj").data == b"two"
    assert put_if_version(store, "p/absent", b"x", first) is None and read_versioned(store, "p/absent") is None


def test_second_writer_is_refused_naming_the_holder(store: LocalStore | S3Store) -> None:
    with acquire_lease(store, "lat", holder="run-A", ttl_s=30) as lease:
        with pytest.raises(LeaseHeld) as refused:
            with acquire_lease(store, "lat", holder="run-B", ttl_s=30):
                pass
        text = str(refused.value)
        assert "run-A" in text and socket.gethostname() in text and f"pid {os.getpid()}" in text
        assert lease.record.since in text and "Wait for that writer" in text
        assert read_lease(store, "lat").holder == "run-A"
        lease.check()  # still ours
    assert read_lease(store, "lat") is None  # released
    with acquire_lease(store, "lat", holder="run-B", ttl_s=30) as lease:  # free again: no refusal
        assert lease.took_over is None


def test_expired_lease_is_taken_over_and_the_old_holder_notices(store: LocalStore | S3Store,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with acquire_lease(store, "lat", holder="run-A", ttl_s=0.5, heartbeat=False) as old:
        time.sleep(0.8)  # A stalls past its TTL without renewing
        with caplog.at_level(logging.WARNING, logger="k5data.leases"), \
                acquire_lease(store, "lat", holder="run-B", ttl_s=30) as new:
            assert new.took_over is not None and new.took_over.holder == "run-A"
            assert any("took over stale lease" in r.message and "run-A" in r.message and "expired" in r.message
                       for r in caplog.records)
            with pytest.raises(LeaseLost, match="run-B"):
                old.check()  # the stalled writer must not publish
        assert read_lease(store, "lat") is None  # B released; A's exit deleted nothing of B's


def test_lease_of_a_killed_local_writer_is_taken_over_at_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    code = ("import sys, time; from k5data.leases import acquire_lease; from k5data.object_store import LocalStore\n"
            f"with acquire_lease(LocalStore({str(tmp_path)!r}), 'lat', holder='doomed', ttl_s=3600):\n"
            "    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match="doomed"):  # alive: refused although on this host
            with acquire_lease(store, "lat", holder="next", ttl_s=30):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    record = read_lease(store, "lat")
    assert record.pid == proc.pid and record.expires_at > time.time() + 3000  # its TTL is far from over
    with acquire_lease(store, "lat", holder="next", ttl_s=30) as lease:
        assert lease.took_over.pid == proc.pid


def test_heartbeat_keeps_a_long_writer_s_lease(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with acquire_lease(store, "lat", holder="long", ttl_s=0.6) as lease:
        time.sleep(1.5)  # 2.5 TTLs: renewed in the background
        with pytest.raises(LeaseHeld):
            with acquire_lease(store, "lat", holder="other", ttl_s=1):
                pass
        lease.check()
    forged = LeaseRecord("ghost", "elsewhere", 1, "then", time.time() + 60, 60.0, "t")
    assert put_if_absent(store, lease_key("lat"), forged.encode())  # a live holder on another host
    with pytest.raises(LeaseHeld, match="ghost"):
        with acquire_lease(store, "lat", holder="other", ttl_s=1):
            pass


# --------------------------------------------------------------------------------------------------------------------
# the versioned index


def test_a_lease_being_acquired_by_another_thread_is_live_not_a_leftover(tmp_path: Path, monkeypatch) -> None:
    """The race the concurrent-writers test once lost: thread "first" has written its lease record (same host and
    pid as every thread here) but not yet verified it; a second acquirer reading the record then must see a live
    holder and be refused, not take it over as a record this process left behind."""
    import k5data.leases as leases

    store, real_read = LocalStore(tmp_path), leases.read_versioned
    written, resume, outcome = threading.Event(), threading.Event(), {}

    def paused_read(store_: LocalStore, key: str):
        if threading.current_thread().name == "first" and not written.is_set():
            written.set()  # first's put_if_absent has landed; hold it before its verifying read
            resume.wait(10)
        return real_read(store_, key)

    monkeypatch.setattr(leases, "read_versioned", paused_read)

    def first() -> None:
        with acquire_lease(store, "p", holder="first", heartbeat=False) as lease:
            outcome["first"] = lease.took_over

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert written.wait(10)
        with pytest.raises(LeaseHeld, match="first"):
            with acquire_lease(store, "p", holder="second", heartbeat=False):
                pass
    finally:
        resume.set()
        thread.join(10)
    assert outcome == {"first": None} and read_lease(store, "p") is None  # first held it and released it


def test_concurrent_writers_on_s3_end_with_one_refusal_and_every_sample_once(s3_endpoint: str) -> None:
    store = S3Store("leases", "concurrent", endpoint_url=s3_endpoint)
    samples = latent_samples(12)
    outcomes: dict[str, object] = {}
    started = threading.Barrier(2)

    def writer(name: str) -> None:
        def slow() -> Iterator[LatentSample]:
            for s in samples:
                time.sleep(0.05)
                yield s
        started.wait()
        try:
            outcomes[name] = write_shards(slow(), store, "lat", per_shard=ONE, holder=name)
        except LeaseHeld as err:
            outcomes[name] = err

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    refused = [o for o in outcomes.values() if isinstance(o, LeaseHeld)]
    assert len(refused) == 1 and sorted(o for o in outcomes.values() if isinstance(o, int)) == [12]
    assert refused[0].record.holder in ("one", "two")
    ids = read_index(store, "lat").column("sample_id").to_pylist()
    assert sorted(ids) == sorted(archived_ids(store, "lat")) == sorted(s.id for s in samples)


def test_conflicting_publish_is_refused_and_the_first_one_stays(store: LocalStore | S3Store) -> None:
    write_shards(latent_samples(2), store, "lat", per_shard=ONE)
    table, head = read_index_head(store, "lat")
    ours = publish_index(store, "lat", table.slice(0, 1), head, "w1")
    with pytest.raises(IndexConflict, match="another writer"):
        publish_index(store, "lat", table, head, "w2")  # started from the same head: would drop w1's change
    assert read_index_head(store, "lat")[1] == ours and read_index(store, "lat").num_rows == 1
    assert not [k for k in store.list("lat/indexes/") if "w2" in k]  # the refused version was removed


class FailingIndexStore(LocalStore):
    """A folder store whose index-version writes die half way (a crash or a full disk mid-write): the partial bytes
    are left at the destination key, as a non-atomic file system or client would leave them."""

    def put_bytes(self, key: str, data: bytes) -> str:
        if "/indexes/" in key:
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[:len(data) // 2])
            raise OSError(28, "No space left on device (injected)")
        return super().put_bytes(key, data)


def test_failure_mid_index_write_leaves_the_previous_index_visible(tmp_path: Path) -> None:
    samples = latent_samples(6)
    write_shards(samples[:3], LocalStore(tmp_path), "lat", per_shard=ONE)
    before = read_index(LocalStore(tmp_path), "lat")
    with pytest.raises(OSError, match="injected"):
        write_shards(samples, FailingIndexStore(tmp_path), "lat", per_shard=ONE)
    assert read_index(LocalStore(tmp_path), "lat").equals(before)  # the old version, whole
    assert read_lease(LocalStore(tmp_path), "lat") is None  # the failed writer released its lease
    write_shards(samples, LocalStore(tmp_path), "lat", per_shard=ONE)  # a healthy re-run completes
    ids = read_index(LocalStore(tmp_path), "lat").column("sample_id").to_pylist()
    assert sorted(ids) == sorted(archived_ids(LocalStore(tmp_path), "lat")) == [s.id for s in samples]
    versions = [v.rsplit("/", 1)[1].split("-")[1] for v in LocalStore(tmp_path).list("lat/indexes/")]
    assert versions == [f"{g:08d}" for g in range(1, 7)]  # the half-written version was removed


def test_readers_never_see_no_index_while_versions_are_published_and_pruned(store: LocalStore | S3Store) -> None:
    samples = latent_samples(16)
    write_shards(samples[:1], store, "lat", per_shard=ONE)
    seen, errors, stop = [], [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(read_index(store, "lat").num_rows)
            except Exception as err:  # any failure to read a published index is the defect under test
                errors.append(err)

    t = threading.Thread(target=reader)
    t.start()
    try:
        write_shards(samples, store, "lat", per_shard=ONE)  # 15 more publishes, each pruning old versions
    finally:
        stop.set()
        t.join()
    assert not errors and seen and min(seen) >= 1 and seen == sorted(seen) and max(seen) <= 16
    generations = [int(v.rsplit("/", 1)[1].split("-")[1]) for v in store.list("lat/indexes/")]
    assert generations == [1, 13, 14, 15, 16]  # the first run's last version stays (lineage), the second's last 4


def test_legacy_bare_index_is_read_and_migrated(tmp_path: Path) -> None:
    import io

    import pyarrow.parquet as pq

    store = LocalStore(tmp_path)
    samples = latent_samples(4)
    write_shards(samples[:2], store, "lat", per_shard=ONE)
    table = read_index(store, "lat")
    for key in store.list("lat/"):  # rewrite as a store from before the pointer: index.parquet only
        if "/indexes/" in key or key.endswith("index.json"):
            store.delete_prefix(key)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put_bytes("lat/index.parquet", buf.getvalue())
    assert read_index(store, "lat").equals(table)
    write_shards(samples, store, "lat", per_shard=ONE)
    assert not store.exists("lat/index.parquet") and store.exists("lat/index.json")
    assert sorted(read_index(store, "lat").column("sample_id").to_pylist()) == [s.id for s in samples]


def test_unlisted_archives_are_removed_and_numbers_never_collide(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    samples = latent_samples(4)
    with pytest.raises(RuntimeError, match="simulated"):
        write_shards(samples, store, "lat", per_shard=ONE, fail_after=1)
    store.put_bytes("lat/shards/image/low/shard-000001-deadbeef.tar", b"orphan of a killed writer")
    with acquire_lease(store, "lat", holder="t") as lease:
        writer = ShardWriter(store, "lat", lease, ONE)
        assert writer.orphans_deleted == 1 and not store.exists("lat/shards/image/low/shard-000001-deadbeef.tar")
        for s in samples:
            writer.add(s)
        writer.close()
    names = read_index(store, "lat").column("shard").to_pylist()
    assert len(set(names)) == 4 and sorted(archived_ids(store, "lat")) == [s.id for s in samples]
    tags = {n.rsplit("-", 1)[1] for n in names}
    assert len(tags) == 2  # two writers, two name spaces: an archive name is never reused


# --------------------------------------------------------------------------------------------------------------------
# `k5 latents` end to end


def _png(path: Path, seed: int) -> None:
    rgb = np.random.default_rng(seed).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


@pytest.fixture
def image_dataset(tmp_path: Path) -> Path:
    """A curated dataset of 6 passed images (the columns `k5 curate` writes)."""
    root = tmp_path / "curated"
    (root / "media").mkdir(parents=True)
    rows = []
    for i in range(6):
        media = root / "media" / f"img{i}.png"
        _png(media, i)
        rows.append({"media_id": f"img{i}", "source_uri": media.as_uri(), "kind": "image", "scene_index": 0,
                     "width": 96, "height": 64, "bucket": 256, "caption": f"picture {i}", "passed": True})
    part = root / "dataset" / "256" / "t"
    part.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(part / "part-00000.parquet")
    return root


def _latents_cmd(dataset: Path, out: Path, vae: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "k5cli.latents", str(dataset), str(out), "--prefix", "lat", "--video-vae",
            str(vae), "--demo", "--no-progress", *extra]


@pytest.mark.slow
def test_two_concurrent_k5_latents_runs_one_refused(image_dataset: Path, tiny_t2v_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "objects"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "K5_LATENTS_SLEEP_S": "1.0"}
    cmd = _latents_cmd(image_dataset, out, tiny_t2v_dir, "--per-shard", "image/low=2", "--json")
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=240), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], [r[2][-1500:] for r in results]
    winner = next(r for r in results if r[0] == 0)
    loser = next(r for r in results if r[0] == 1)
    error_lines = [line for line in loser[2].splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("Error:") and "Traceback" not in loser[2]
    holder_pid = procs[[r[0] for r in results].index(0)].pid
    assert f"pid {holder_pid}" in error_lines[0] and "k5 latents" in error_lines[0] and "since" in error_lines[0]
    assert json.loads(winner[1])["encoded"] == 6
    store = LocalStore(out)
    ids = read_index(store, "lat").column("sample_id").to_pylist()
    assert sorted(ids) == sorted(archived_ids(store, "lat")) == [f"img{i}-0" for i in range(6)]
    assert read_lease(store, "lat") is None and not store.list("lat/pending/")


@pytest.mark.slow
def test_sigkill_loses_at_most_the_spill_bound(image_dataset: Path, tiny_t2v_dir: Path, tmp_path: Path) -> None:
    """Default archive sizes (1,024 low-res images): before this, a kill lost every encoded image; with spills the
    restart encodes only what was not yet spilled (here --spill-every 1: at most the sample in flight)."""
    out = tmp_path / "objects"
    store = LocalStore(out)
    cmd = _latents_cmd(image_dataset, out, tiny_t2v_dir, "--spill-every", "1", "--batch", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "K5_LATENTS_SLEEP_S": "0.4"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while len(store.list("lat/pending/")) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "nothing spilled within 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert read_index(store, "lat").num_rows == 0  # no archive was complete: all work so far is in pending/
    spilled = set()
    for key in store.list("lat/pending/"):
        with store.open_read(key) as f:
            spilled |= {s.id for s in read_tar(f)}
    assert 3 <= len(spilled) < 6

    env.pop("K5_LATENTS_SLEEP_S")
    done = subprocess.run([*cmd, "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["recovered_pending"] == len(spilled) and summary["encoded"] == 6 - len(spilled)
    assert summary["took_over_lease_of"] and f"pid {proc.pid}" in summary["took_over_lease_of"]  # dead pid
    ids = read_index(store, "lat").column("sample_id").to_pylist()
    assert sorted(ids) == sorted(archived_ids(store, "lat")) == [f"img{i}-0" for i in range(6)]
    assert not store.list("lat/pending/")  # spills deleted once archived


def test_vanished_media_is_skipped_and_reported(image_dataset: Path, tiny_t2v_dir: Path, tmp_path: Path) -> None:
    from k5cli.latents import latents

    (image_dataset / "media" / "img2.png").unlink()  # deleted after curation
    out = tmp_path / "objects"
    args = [str(image_dataset), str(out), "--prefix", "lat", "--video-vae", str(tiny_t2v_dir), "--demo",
            "--no-progress"]
    result = CliRunner().invoke(latents, args)
    assert result.exit_code == 0, result.output
    assert "encoded 5 samples" in result.output
    assert "skipped img2-0: media vanished since curation" in result.output and "img2.png" in result.output
    assert sorted(read_index(LocalStore(out), "lat").column("sample_id").to_pylist()) == \
        [f"img{i}-0" for i in range(6) if i != 2]
    _png(image_dataset / "media" / "img2.png", 2)  # restored: the next run encodes it
    again = CliRunner().invoke(latents, [*args, "--json"])
    assert again.exit_code == 0 and json.loads(again.output)["encoded"] == 1


def test_broken_model_folders_end_in_one_error_line(image_dataset: Path, tiny_t2v_dir: Path, tmp_path: Path) -> None:
    import shutil

    from k5cli.latents import latents

    garbage = tmp_path / "garbage"
    (garbage / "vae").mkdir(parents=True)
    (garbage / "vae" / "config.json").write_text("{not json")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_t2v_dir / "vae", truncated / "vae")
    weights = truncated / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {tmp_path / "missing": "does not exist", garbage: "cannot load the video VAE", truncated:
             "cannot load the video VAE", empty: "cannot load the video VAE"}
    for folder, expected in cases.items():
        result = CliRunner().invoke(latents, [str(image_dataset), str(tmp_path / "objects"), "--video-vae",
                                              str(folder), "--demo", "--no-progress"])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), (folder, result.output)
        assert expected in lines[0] and str(folder) in lines[0] and "pass" in lines[0]
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_latent_asset_refuses_while_another_writer_holds_the_prefix(image_dataset: Path, tiny_t2v_dir: Path,
                                                                     tmp_path: Path) -> None:
    import dagster as dg

    from assets.curation import curated_dataset
    from assets.latents import latent_assets
    from orchestration.resources import CurationResource, K5HomeResource, ObjectStoreResource

    resources = {"curation": CurationResource(), "object_store": ObjectStoreResource(base_uri=str(tmp_path / "obj")),
                 "k5_home": K5HomeResource(home=str(tmp_path / "home"))}
    with dg.instance_for_test() as instance:
        for key, path in ((curated_dataset.key, image_dataset), ("tiny_model_bundle", tiny_t2v_dir)):
            instance.report_runless_asset_event(dg.AssetMaterialization(key, metadata={"path": str(path)}))
        with acquire_lease(LocalStore(tmp_path / "obj"), "latents", holder="Dagster run other-run", ttl_s=60):
            refused = dg.materialize([latent_assets[0]], resources=resources, instance=instance,
                                     raise_on_error=False)
        assert not refused.success
        [failure] = [e for e in refused.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        assert "being written by Dagster run other-run" in failure.event_specific_data.error.message
        assert read_index(LocalStore(tmp_path / "obj"), "latents").num_rows == 0  # nothing written meanwhile
        done = dg.materialize([latent_assets[0]], resources=resources, instance=instance)  # free: it runs
        meta = done.asset_materializations_for_node("latent_shards")[0].metadata
        assert meta["samples"].value == 6 and "/indexes/index-" in meta["index_uri"].value

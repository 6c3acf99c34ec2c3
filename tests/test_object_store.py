"""Object stores (k5data.object_store): the same contract on a local folder and a real HTTP S3 endpoint (moto server),
and the curation output written and rewritten through them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import moto_s3_server

from k5data.object_store import LocalStore, ObjectStore, S3Store, key_order, open_store


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    if request.param == "local":
        return open_store(tmp_path / "objs")
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"b{abs(hash(str(tmp_path))) % 10**8}"  # a fresh bucket per test
    store = open_store(f"s3://{bucket}/root", endpoint_url=endpoint)
    store.client.create_bucket(Bucket=bucket)
    return store


def test_bytes_round_trip_and_missing_keys(store: ObjectStore, tmp_path: Path) -> None:
    uri = store.put_bytes("a/b.bin", b"hello")
    assert uri == store.uri("a/b.bin") and store.exists("a/b.bin")
    assert store.get_bytes("a/b.bin") == b"hello"
    assert store.put_bytes("a/b.bin", b"again") == uri and store.get_bytes("a/b.bin") == b"again"  # overwrite
    assert store.get_file("a/b.bin", tmp_path / "back" / "b.bin").read_bytes() == b"again"
    with store.open_read("a/b.bin") as fh:
        assert fh.read() == b"again"
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        store.get_bytes("missing.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        store.get_file("missing.bin", tmp_path / "m")
    assert not store.exists("missing.bin") and not store.exists("a/b")  # a key prefix is not an object


def test_s3_download_small_objects_in_one_get_and_large_ones_in_ranged_parts(
        s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from s3_faults import fault_proxy

    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    big = bytes(range(256)) * (6 * 4096 + 7)  # 6 MiB and a bit: above a 5 MiB threshold, two ranged parts
    with fault_proxy(s3_endpoint) as proxy:
        store = S3Store("downloads", "p", endpoint_url=proxy.url, multipart_threshold=5 * 1024 * 1024)
        store.client.create_bucket(Bucket="downloads")
        store.put_bytes("small.bin", b"tiny")
        store.put_bytes("big.bin", big)
        proxy.requests.clear()
        assert store.get_file("small.bin", tmp_path / "small.bin").read_bytes() == b"tiny"
        assert proxy.requests == {"list": 1, "read": 1}  # the existence listing and ONE GET (no HEAD)
        proxy.requests.clear()
        assert store.get_file("big.bin", tmp_path / "big.bin").read_bytes() == big
        assert proxy.requests["read"] >= 3  # HEAD, then a GET per part
        assert not list(tmp_path.glob("*.partial"))


def test_list_info_sizes_and_versions(store: ObjectStore) -> None:
    store.put_bytes("d/x.bin", b"12345")
    store.put_bytes("d/y/z.bin", b"1")
    store.put_bytes("e.bin", b"")
    infos = store.list_info("d/")
    assert [(i.key, i.size) for i in infos] == [("d/x.bin", 5), ("d/y/z.bin", 1)]
    before = infos[0].version
    store.put_bytes("d/x.bin", b"54321-changed")
    after = store.list_info("d/")[0]
    assert after.size == 13 and after.version != before  # new content, new version
    assert store.list() == ["d/x.bin", "d/y/z.bin", "e.bin"]


def test_delete_prefix_deletes_only_under_the_prefix(store: ObjectStore) -> None:
    for key in ("dataset/256/a/part.parquet", "dataset/512/b/part.parquet", "datasets.txt", "quarantine.parquet"):
        store.put_bytes(key, b"x")
    assert store.delete_prefix("dataset/") == 2
    assert store.list() == ["datasets.txt", "quarantine.parquet"]  # the sibling with a longer name is kept
    assert store.delete_prefix("dataset/") == 0  # idempotent
    assert store.delete_prefix("data") == 1  # a plain string prefix, as in S3
    assert store.list() == ["quarantine.parquet"]
    for empty in ("", "/"):
        with pytest.raises(ValueError, match="non-empty prefix"):
            store.delete_prefix(empty)
    assert store.list() == ["quarantine.parquet"]


def test_delete_prefix_local_removes_emptied_folders_and_partials(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("dataset/256/a/part.parquet", b"x")
    (tmp_path / "dataset" / "256" / "a" / "part2.parquet.partial").write_bytes(b"half")  # a crashed write
    store.put_bytes("keep/k.bin", b"k")
    assert store.list() == ["dataset/256/a/part.parquet", "keep/k.bin"]  # partial files are never listed
    assert store.delete_prefix("dataset/") == 1
    assert not (tmp_path / "dataset").exists() and (tmp_path / "keep" / "k.bin").is_file()


def test_child_store_and_location_round_trip(store: ObjectStore) -> None:
    child = store.child("curation")
    child.put_bytes("dataset/x.parquet", b"p")
    assert store.list() == ["curation/dataset/x.parquet"]
    assert child.uri("dataset/x.parquet") == store.uri("curation/dataset/x.parquet")
    endpoint = store.endpoint_url if isinstance(store, S3Store) else None
    again = open_store(child.location, endpoint_url=endpoint)
    assert again.list() == ["dataset/x.parquet"] and again.get_bytes("dataset/x.parquet") == b"p"


def test_open_store_create_flag_and_errors(tmp_path: Path) -> None:
    missing = tmp_path / "not_yet"
    reader = open_store(missing, create=False)
    assert not missing.exists() and reader.list() == [] and reader.list_info() == []
    assert isinstance(open_store(missing.as_uri()), LocalStore) and missing.is_dir()
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///prefix")
    with pytest.raises(ValueError, match="gs"):
        open_store("gs://bucket/prefix")


def test_key_order_walks_folders_first() -> None:
    keys = ["a-b/x", "a/y", "a/x"]
    assert sorted(keys, key=key_order) == ["a/x", "a/y", "a-b/x"]  # as a folder walk lists them
    assert sorted(keys) == ["a-b/x", "a/x", "a/y"]  # plain string order would differ


def _row(media_id: str, source: str) -> dict:
    """One passed dataset row of curation's output layout."""
    from k5data.curation.output import COLUMNS

    r = {c: None for c in COLUMNS}
    r.update(media_id=media_id, source=source, source_uri=f"file:///{source}/{media_id}", kind="image",
             scene_index=0, width=256, height=256, size=1, bucket=256, cluster=-1, passed=True)
    return r


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_curation_output_rewritten_whole(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``write_outputs`` publishes a new version through the store and switches ``CURRENT.json`` to it: a source gone
    from the catalog leaves the current version, and versions older than the previous one are deleted."""
    from k5data.curation.config import load_config
    from k5data.curation.output import current_version, read_dataset, write_outputs

    cfg = load_config()
    if kind == "local":
        out: str = str(tmp_path / "out")
    else:
        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        endpoint = request.getfixturevalue("s3_endpoint")
        cfg = load_config(overrides={"s3": {"endpoint_url": endpoint}})
        store = open_store("s3://curated", endpoint_url=endpoint)
        store.client.create_bucket(Bucket="curated")
        out = "s3://curated/run"

    first = write_outputs([_row("m1", "alpha"), _row("m2", "beta")], [], out, cfg)
    assert len(first) == 4 and first[-1].endswith("/CURRENT.json")
    assert all(u.startswith("s3://" if kind == "s3" else "file://") for u in first)
    assert sorted(read_dataset(out, cfg)["media_id"]) == ["m1", "m2"]
    write_outputs([_row("m1", "alpha")], [{"source_uri": "file:///bad", "reason": "truncated"}], out, cfg)
    reread = read_dataset(out, cfg)
    assert list(reread["media_id"]) == ["m1"]
    write_outputs([_row("m1", "alpha")], [], out, cfg)
    now = current_version(out, cfg)
    listed = open_store(out, cfg.endpoint_url, create=False).list()
    assert listed == ["CURRENT.json"] + sorted(  # the first version (with beta's part file) is gone
        f"versions/{v}/{k}" for v in (now["previous"], now["version"])
        for k in ("dataset/256/alpha/part-00000.parquet", "quarantine.parquet"))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_curation_output_one_writer_at_a_time(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset write holds the output's lease: while another writer holds it, ``write_outputs`` is refused naming
    that holder and the current version stays as it was; once it is released the write goes through."""
    from k5data.curation.config import load_config
    from k5data.curation.output import current_version, read_dataset, write_outputs
    from k5data.leases import LeaseHeld, acquire_lease

    cfg = load_config()
    out: str = str(tmp_path / "out")
    if kind == "s3":
        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        endpoint = request.getfixturevalue("s3_endpoint")
        cfg = load_config(overrides={"s3": {"endpoint_url": endpoint}})
        open_store("s3://curated", endpoint_url=endpoint).client.create_bucket(Bucket="curated")
        out = "s3://curated/run"
    write_outputs([_row("m1", "alpha")], [], out, cfg)
    before = current_version(out, cfg)
    store = open_store(out, cfg.endpoint_url, create=False)
    with acquire_lease(store, "", holder="curation run 7 of alice", heartbeat=False):
        with pytest.raises(LeaseHeld, match="curation run 7 of alice"):
            write_outputs([_row("m2", "beta")], [], out, cfg)
        assert current_version(out, cfg) == before
    write_outputs([_row("m2", "beta")], [], out, cfg)
    assert list(read_dataset(out, cfg)["media_id"]) == ["m2"]

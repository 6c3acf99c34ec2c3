"""The production Dagster instance (infra/dagster.yaml) on a real PostgreSQL server.

A server from Debian's ``postgresql`` package is started for this module (``orchestration.local_postgres``: initdb +
pg_ctl in a temp folder, 127.0.0.1, a free port, password auth). The instance is built from infra/dagster.yaml with
its storage and concurrency sections unchanged (credentials through the ``DAGSTER_PG_*`` variables it references)
and only the Kubernetes run launcher swapped for the default one (no cluster here). One curation shard partition is
launched the way the UI launches it (``orchestration.launch.run_job``), the curated dataset asset is built over it,
and the runs, events and materializations are then read back with SQL straight from Postgres, not through the
instance.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster._core.events.log import EventLogEntry
from dagster._serdes import deserialize_value

from orchestration.local_postgres import INSTALL_HINT, PostgresServer, local_postgres, postgres_bin_dir
from orchestration.settings import K5Paths, offline_env

pytestmark = pytest.mark.slow  # a real server and two Dagster runs (about a minute)

REPO = Path(__file__).resolve().parents[1]
PROD_YAML = REPO / "infra" / "dagster.yaml"
SHARD = "0"
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}  # steps in the run process: no per-step start-up


def _postgres_binaries_or_skip() -> None:
    """`make test` installs the package first (`make postgres`); a bare pytest run tries the same target once."""
    if postgres_bin_dir() is not None:
        return
    proc = subprocess.run(["make", "-s", "postgres"], cwd=REPO, capture_output=True, text=True)
    if postgres_bin_dir() is None:
        pytest.skip(f"PostgreSQL server binaries are missing and `make postgres` could not install them "
                    f"(exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-400:]}); {INSTALL_HINT}")


def instance_yaml_for_test(dagster_home: Path) -> dict:
    """infra/dagster.yaml with the default run launcher (runs in local processes; it cannot resume a run worker)
    and its two local folders moved under ``dagster_home``; storage, run queue and concurrency stay as in
    production."""
    from orchestration.prod_local import local_instance_config  # the same file `make prod-local` writes

    assert yaml.safe_load(PROD_YAML.read_text())["run_launcher"]["class"] == "K8sRunLauncher"
    cfg = local_instance_config(dagster_home)
    assert cfg["run_launcher"]["class"] == "DefaultRunLauncher"
    return cfg


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    _postgres_binaries_or_skip()
    with local_postgres(databases=("dagster",)) as server:
        yield server


@pytest.fixture(scope="module")
def materialized(pg: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from assets.curation import curated_dataset, raw_sources, scored_scenes
    from orchestration.launch import run_job
    from orchestration.resources import default_resources

    offline_env()
    root = tmp_path_factory.mktemp("pg_instance")
    dagster_home = root / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml_for_test(dagster_home)))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in pg.dagster_env("dagster").items():
            mp.setenv(key, value)
        mp.setenv("K5_HOME", str(root / "k5"))
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        paths = K5Paths.from_env().ensure()
        # K5Paths.ensure writes the local SQLite dagster.yaml into its own dagster folder, not into ours
        assert paths.dagster_home != dagster_home
        t0 = time.perf_counter()
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            shard = run_job("curation_shards_job", instance=instance, partition_key=SHARD, in_process=True,
                            run_config=IN_PROCESS)
            # the dataset asset over the shard scored above (its checks are not part of this run)
            resources = {k: v for k, v in default_resources().items() if k in ("k5_home", "curation", "object_store")}
            dataset = dg.materialize([raw_sources, scored_scenes, curated_dataset], instance=instance,
                                     selection=dg.AssetSelection.assets(curated_dataset), resources=resources,
                                     tags={"k5/test": "postgres"})
            yield {"instance": instance, "shard": shard, "dataset": dataset, "home": dagster_home,
                   "seconds": time.perf_counter() - t0}


def _rows(pg: PostgresServer, query: str, **params: object) -> list[sa.Row]:
    engine = sa.create_engine(pg.url("dagster"))
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(query), params))
    finally:
        engine.dispose()


def test_instance_uses_postgres_from_the_production_yaml(materialized: dict) -> None:
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    instance = materialized["instance"]
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    # nothing fell back to Dagster's SQLite files
    assert not list(materialized["home"].rglob("*.db"))
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_runs_events_and_materializations_are_in_postgres(pg: PostgresServer, materialized: dict) -> None:
    shard, dataset = materialized["shard"], materialized["dataset"]
    assert shard.success, (shard.step_failures, shard.run_failure)
    assert dataset.success
    runs = {r.run_id: r for r in _rows(pg, "SELECT run_id, pipeline_name, status FROM runs")}
    assert set(runs) == {shard.run_id, dataset.run_id}
    assert (runs[shard.run_id].pipeline_name, runs[shard.run_id].status) == ("curation_shards_job", "SUCCESS")
    assert runs[dataset.run_id].status == "SUCCESS"

    tags = dict(_rows(pg, "SELECT key, value FROM run_tags WHERE run_id = :r", r=shard.run_id))
    assert tags["dagster/partition"] == SHARD
    assert tags["dagster/code_location"] == "orchestration.definitions"  # launched as the UI launches it
    assert dict(_rows(pg, "SELECT key, value FROM run_tags WHERE run_id = :r", r=dataset.run_id))["k5/test"] == \
        "postgres"

    events = _rows(pg, "SELECT run_id, dagster_event_type FROM event_logs WHERE dagster_event_type IS NOT NULL")
    types = {(e.run_id, e.dagster_event_type) for e in events}
    for run_id in (shard.run_id, dataset.run_id):
        assert {(run_id, "PIPELINE_START"), (run_id, "PIPELINE_SUCCESS"), (run_id, "STEP_SUCCESS")} <= types

    mats = _rows(pg, "SELECT run_id, asset_key, partition, event FROM event_logs "
                     "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' ORDER BY id")
    by_key = {(m.run_id, json.loads(m.asset_key)[0], m.partition): m for m in mats}
    assert set(by_key) == {(shard.run_id, "raw_sources", SHARD), (shard.run_id, "scored_scenes", SHARD),
                           (dataset.run_id, "curated_dataset", None)}
    # the stored event (Dagster's serialized EventLogEntry) carries the asset's metadata: what the run reported
    entry = deserialize_value(by_key[(shard.run_id, "raw_sources", SHARD)].event, EventLogEntry)
    stored = entry.asset_materialization.metadata
    assert stored["new_media"].value == shard.metadata("raw_sources")["new_media"] > 0
    entry = deserialize_value(by_key[(dataset.run_id, "curated_dataset", None)].event, EventLogEntry)
    (reported,) = dataset.asset_materializations_for_node("curated_dataset")
    assert entry.asset_materialization.metadata["rows"] == reported.metadata["rows"]
    assert reported.metadata["rows"].value > 0
    asset_keys = {json.loads(r.asset_key)[0] for r in _rows(pg, "SELECT asset_key FROM asset_keys")}
    assert {"raw_sources", "scored_scenes", "curated_dataset"} <= asset_keys
    print(f"\nPostgres instance: curation shard {SHARD} + curated_dataset in {materialized['seconds']:.1f} s")


def test_gpu_pool_limit_is_enforced_through_postgres(pg: PostgresServer, materialized: dict) -> None:
    """The `gpu` pool (training stages) starts at the yaml's default limit 1: a second GPU step waits for the first
    one's slot, then gets it; raising the limit (what `dagster instance concurrency set gpu 2` does) lands in
    Postgres."""
    from orchestration.definitions import defs

    train = [a for a in defs.resolve_all_asset_specs() if a.key.to_user_string().startswith("train_")]
    assert train
    pools = {defs.resolve_assets_def(a.key).op.pool for a in train}
    assert pools == {"gpu"}

    storage = materialized["instance"].event_log_storage
    storage.initialize_concurrency_limit_to_default("gpu")
    assert [tuple(r) for r in _rows(pg, "SELECT concurrency_key, \"limit\" FROM concurrency_limits")] == \
        [("gpu", 1)]
    first = storage.claim_concurrency_slot("gpu", "run-a", "train_a")
    second = storage.claim_concurrency_slot("gpu", "run-b", "train_b")
    assert first.is_claimed and not second.is_claimed  # the limit decides both ways
    held = _rows(pg, "SELECT run_id, step_key FROM concurrency_slots WHERE concurrency_key = 'gpu' "
                     "AND run_id IS NOT NULL")
    assert [tuple(r) for r in held] == [("run-a", "train_a")]
    storage.free_concurrency_slots_for_run("run-a")
    assert storage.claim_concurrency_slot("gpu", "run-b", "train_b").is_claimed
    storage.set_concurrency_slots("gpu", 2)
    assert _rows(pg, "SELECT \"limit\" FROM concurrency_limits WHERE concurrency_key = 'gpu'")[0][0] == 2
    storage.free_concurrency_slots_for_run("run-b")

"""The production Definitions (issue 21): they load with the production resources and no network, and
``make prod-local``'s launcher runs the curation through a local Postgres instance, S3 (moto), an MLflow server and a
Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestration.local_postgres import INSTALL_HINT, postgres_bin_dir
from orchestration.production import production_executor, production_resources

REPO = Path(__file__).resolve().parents[1]
PROD_ENV = {"K5_DEPLOYMENT": "production", "K5_OBJECT_STORE": "s3://k5-objects",
            "K5_S3_ENDPOINT_URL": "http://minio.k5.svc.cluster.local:9000",
            "MLFLOW_TRACKING_URI": "http://mlflow.k5.svc.cluster.local:5000",
            "AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "test-key", "AWS_DEFAULT_REGION": "us-east-1",
            "K5_RAY_ADDRESS": "k5-ray-head-svc.k5.svc.cluster.local:6379", "K5_PIPES": "k8s",
            "K5_TRAIN_IMAGE": "registry.example.com/k5:1", "K5_HOME_PVC": "k5-home", "K5_TRAIN_NODES": "4",
            "K5_GPUS_PER_POD": "8", "K5_EXECUTOR": "k8s", "K5_K8S_NAMESPACE": "k5"}

# Every outgoing connection fails in the child (loopback included, so nothing local is reached either).
NO_NETWORK = textwrap.dedent("""
    import socket
    def _refuse(*args, **kwargs):
        raise OSError("network disabled in this test")
    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse
""")


def test_definitions_load_with_production_resources_and_no_network(tmp_path: Path) -> None:
    code = NO_NETWORK + textwrap.dedent("""
        import dagster as dg
        from orchestration.definitions import defs
        repo = defs.get_repository_def()
        res = defs.resources  # as configured (the repository holds them as resource definitions)
        assert res["object_store"].base_uri == "s3://k5-objects", res["object_store"]
        assert res["mlflow"].tracking_uri == "http://mlflow.k5.svc.cluster.local:5000"
        assert res["mlflow"].artifact_location == "s3://k5-objects/mlflow"
        assert res["curation"].ray_address == "k5-ray-head-svc.k5.svc.cluster.local:6379"
        assert res["training_job"].backend == "k8s" and res["training_job"].nodes == 4
        assert res["training_job"].default_nproc() == 32
        job = repo.get_job("main_job")
        print("executor", job.executor_def.name)
        tags = defs.get_assets_def("latent_shards").op.tags
        assert '"nvidia.com/gpu": "1"' in tags["dagster-k8s/config"], tags
        print("ok", len(repo.get_all_jobs()))
    """)
    env = {**os.environ, **PROD_ENV, "K5_HOME": str(tmp_path / "k5")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "executor k5_k8s_job_executor" in proc.stdout and "\nok " in proc.stdout


def test_production_settings_are_checked() -> None:
    resources = production_resources(PROD_ENV)
    assert resources["object_store"].endpoint_url == PROD_ENV["K5_S3_ENDPOINT_URL"]
    with pytest.raises(ValueError) as err:
        production_resources({"K5_OBJECT_STORE": "/data/objects", "MLFLOW_TRACKING_URI": "sqlite:///m.db"})
    for name in ("K5_OBJECT_STORE", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert name in str(err.value)
    assert production_executor({}) is None
    with pytest.raises(ValueError, match="K5_EXECUTOR='celery'"):
        production_executor({"K5_EXECUTOR": "celery"})


@pytest.mark.slow
def test_prod_local_runs_the_curation_through_postgres_s3_mlflow_and_ray(tmp_path: Path) -> None:
    if postgres_bin_dir() is None:
        pytest.skip(f"PostgreSQL server binaries are missing; {INSTALL_HINT}")
    markers = tmp_path / "ray_tasks"  # each Ray task records its process id here (k5data.curation.ray_exec)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("K5_", "DAGSTER_", "MLFLOW_TRACKING", "AWS_"))}
    env.update(K5_CURATION_TASK_MARKERS=str(markers), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.prod_local", "--images-only", "--json",
                             "--root", str(tmp_path / "state")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ok"]
    assert summary["shard_runs"] == {str(i): True for i in range(4)} and summary["dataset_run"]
    assert summary["checks"] == {"no_duplicate_hashes": True, "passed_rows_captioned": True,
                                 "bucket_counts_sane": True}
    assert summary["path"] == "s3://k5-objects/curation" and summary["rows"] == 16  # 5 editing cases
    keys = summary["object_keys"]  # under the store's curation/ prefix
    assert any(k.endswith("/quarantine.parquet") for k in keys), keys
    assert any("/dataset/" in k and k.endswith(".parquet") for k in keys), keys
    # Runs and materializations were recorded in Postgres: 4 shard runs + the dataset run.
    assert summary["postgres_runs"] == {"SUCCESS": 5}
    assert summary["postgres_materializations"] >= 9
    # MLflow artifacts land in the one object store, written by the client (the server does not proxy them).
    assert summary["mlflow_artifact"].startswith("s3://k5-objects/mlflow/")
    # The shard work ran as Ray tasks: one register and one score task per shard, in Ray worker processes.
    records = [json.loads(p.read_text()) for p in markers.glob("*.json")]
    assert sorted((r["step"], r["shard"]) for r in records) == sorted(
        (step, shard) for step in ("register", "score") for shard in range(4))
    assert proc.pid not in {r["pid"] for r in records}


def test_make_up_without_docker_says_what_to_do() -> None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        pytest.skip("Docker Compose is installed here: `make up` would start the stack")
    proc = subprocess.run(["make", "-s", "up"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Docker with the compose plugin is needed" in proc.stderr and "make prod-local" in proc.stderr
    assert not (REPO / "infra" / ".env").exists()  # the check comes before anything is written

"""``make prod-local``: the production Definitions on one machine, without Docker or a cluster.

Starts a PostgreSQL server (``local_postgres``: databases ``dagster`` and ``mlflow``), moto's S3 server as the one
object store (bucket ``k5-objects``), an MLflow tracking server on that Postgres with artifacts in that store
(``--no-serve-artifacts``, as in infra/k8s/mlflow.yaml) and a Ray cluster (head + workers on 127.0.0.1); writes a
``DAGSTER_HOME`` whose ``dagster.yaml`` is infra/dagster.yaml with the default run launcher (no cluster); sets the
variables of ``orchestration.production`` (``K5_DEPLOYMENT=production``, ``K5_OBJECT_STORE``, ``K5_RAY_ADDRESS``,
...), so ``orchestration.definitions`` loads the production resources; then runs the curation through it: every
source shard as a ``curation_shards_job`` run launched like the UI does (its register/score work as Ray tasks),
``curated_dataset`` and its checks into the object store. ``--serve`` keeps everything up with ``dagster dev`` on that
instance until Ctrl-C. Everything is deleted on exit unless ``--root`` names a folder to keep.

    python -m orchestration.prod_local [--images-only] [--serve] [--json] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestration.local_postgres import _free_port as free_port
from orchestration.local_postgres import local_postgres
from orchestration.ray_curation import local_ray_cluster

REPO = Path(__file__).resolve().parents[1]
PROD_YAML = REPO / "infra" / "dagster.yaml"
BUCKET = "k5-objects"
SOURCE_PREFIX = "sources/sample"


def local_instance_config(dagster_home: Path) -> dict[str, Any]:
    """infra/dagster.yaml with the default run launcher (runs as local processes; it cannot resume a run worker) and
    its two local folders under ``dagster_home``; storage, run queue and concurrency stay as in production."""
    cfg = yaml.safe_load(PROD_YAML.read_text())
    cfg["run_launcher"] = {"module": "dagster._core.launcher", "class": "DefaultRunLauncher"}
    cfg["run_monitoring"]["max_resume_run_attempts"] = 0  # resuming a run worker is the Kubernetes launcher's
    cfg["compute_logs"]["config"]["base_dir"] = str(dagster_home / "compute_logs")
    cfg["local_artifact_storage"]["config"]["base_dir"] = str(dagster_home / "storage")
    return cfg


@dataclass(frozen=True, kw_only=True)
class ProdLocalStack:
    """The running services and the environment that points the code location at them."""

    env: dict[str, str]
    """``orchestration.production`` variables, ``DAGSTER_HOME``, ``DAGSTER_PG_*``, ``K5_HOME``, S3 credentials."""
    root: Path
    """Folder holding ``dagster_home/``, ``k5/`` (K5_HOME) and the logs."""
    postgres_url: str
    """SQLAlchemy URL of the ``dagster`` database."""
    mlflow_url: str
    """MLflow tracking server."""
    ray_address: str
    """Ray cluster (``CurationResource.ray_address``)."""


@contextmanager
def _mlflow_server(backend_uri: str, env: Mapping[str, str], log: Path) -> Iterator[str]:
    port = free_port()
    # Credentials travel in the environment (MLFLOW_BACKEND_STORE_URI), not on the command line.
    server_env = {**os.environ, **env, "MLFLOW_BACKEND_STORE_URI": backend_uri}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--default-artifact-root", f"{env['K5_OBJECT_STORE']}/mlflow", "--no-serve-artifacts", "--workers", "1"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=server_env, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not answer on {url} within 240 s; see {log}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _upload_sample_corpus(env: Mapping[str, str], images_only: bool, scratch: Path) -> str:
    import boto3

    from k5data.curation.corpus import build_sample_corpus
    from k5data.object_store import open_store

    s3 = boto3.client("s3", endpoint_url=env["K5_S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=BUCKET)
    corpus = build_sample_corpus(scratch / "corpus", videos=not images_only)
    store = open_store(f"s3://{BUCKET}/{SOURCE_PREFIX}", env["K5_S3_ENDPOINT_URL"])
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        store.put_file(path, path.relative_to(corpus).as_posix())
    return store.location


@contextmanager
def prod_local_stack(root: Path, *, images_only: bool = False, ray_workers: int = 1) -> Iterator[ProdLocalStack]:
    """Start every service under ``root``, upload the sample corpus to the object store, and yield the stack.
    ``stack.env`` is applied to ``os.environ`` while the stack is up (the previous values come back on exit), so this
    process (the code location loaded in it, MLflow and S3 clients) talks to these services."""
    from bench.common import moto_s3_server

    dagster_home, k5_home = root / "dagster_home", root / "k5"
    for folder in (dagster_home, k5_home):
        folder.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(local_instance_config(dagster_home), sort_keys=False))
    with ExitStack() as stack:
        saved = dict(os.environ)
        stack.callback(lambda: (os.environ.clear(), os.environ.update(saved)))
        pg = stack.enter_context(local_postgres(databases=("dagster", "mlflow")))
        endpoint = stack.enter_context(moto_s3_server())
        # moto accepts any key pair; fresh random ones keep to the rule that no credential is ever a literal.
        env = {"K5_DEPLOYMENT": "production", "K5_HOME": str(k5_home), "DAGSTER_HOME": str(dagster_home),
               "K5_OBJECT_STORE": f"s3://{BUCKET}", "K5_S3_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint,
               "AWS_ACCESS_KEY_ID": secrets.token_hex(8), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
               "AWS_DEFAULT_REGION": "us-east-1", "K5_PIPES": "subprocess", **pg.dagster_env("dagster")}
        os.environ.update(env)
        env["K5_CURATION_SOURCE"] = _upload_sample_corpus(env, images_only, root)
        env["MLFLOW_TRACKING_URI"] = stack.enter_context(_mlflow_server(
            pg.url("mlflow"), env, root / "mlflow.log"))
        # Ray workers read the source from S3 and write the catalog under K5_HOME: they get the same environment.
        cluster = stack.enter_context(local_ray_cluster(workers=ray_workers, env=env))
        env["K5_RAY_ADDRESS"] = cluster.address
        os.environ.update(env)
        yield ProdLocalStack(env=env, root=root, postgres_url=pg.url("dagster"), mlflow_url=env["MLFLOW_TRACKING_URI"],
                             ray_address=cluster.address)


def run_curation_stage(stack: ProdLocalStack) -> dict[str, Any]:
    """Every curation shard as a ``curation_shards_job`` run (launched like the UI, code location loaded from
    ``orchestration.definitions`` with the production resources), then ``curated_dataset`` and its checks; all
    recorded in the Postgres instance. Returns a summary read back from Postgres, S3 and MLflow. Call it inside
    ``prod_local_stack`` before anything imports ``orchestration.definitions`` (its resources are read at import)."""
    import dagster as dg
    import sqlalchemy as sa

    from assets.curation import CURATION_CHECKS, SHARDS, curated_dataset, raw_sources, scored_scenes
    from orchestration.launch import run_job
    from orchestration.resources import default_resources

    resources = default_resources()
    summary: dict[str, Any] = {"ray_address": stack.ray_address, "shard_runs": {}}
    with dg.DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        for key in SHARDS.get_partition_keys():
            result = run_job("curation_shards_job", instance=instance, partition_key=key, in_process=True,
                             run_config={"execution": {"config": {"in_process": {}}}})
            summary["shard_runs"][key] = result.success
        dataset = dg.materialize([raw_sources, scored_scenes, curated_dataset, *CURATION_CHECKS], instance=instance,
                                 selection=dg.AssetSelection.assets(curated_dataset)
                                 | dg.AssetSelection.checks(*CURATION_CHECKS),
                                 resources=resources, tags={"k5/prod-local": "curation"}, raise_on_error=False)
        summary["dataset_run"] = dataset.success
        summary["checks"] = {e.check_name: e.passed for e in dataset.get_asset_check_evaluations()}
        mats = dataset.asset_materializations_for_node("curated_dataset")
        meta = mats[-1].metadata if mats else {}
        summary.update(path=meta["path"].value if "path" in meta else None,
                       rows=meta["rows"].value if "rows" in meta else None)
    engine = sa.create_engine(stack.postgres_url)
    try:
        with engine.connect() as conn:
            summary["postgres_runs"] = {r.status: r.n for r in conn.execute(sa.text(
                "SELECT status, count(*) AS n FROM runs GROUP BY status"))}
            summary["postgres_materializations"] = conn.execute(sa.text(
                "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")).scalar()
    finally:
        engine.dispose()
    store = resources["object_store"].store()
    summary["object_keys"] = sorted(store.list("curation/"))
    summary["mlflow_artifact"] = _mlflow_round_trip(resources["mlflow"])
    return summary


def _mlflow_round_trip(mlflow_resource: Any) -> str:
    """Log one artifact through the server; returns its URI (in the object store, written by this client)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, mlflow_resource.start_run("prod-local check") as run:
        note = Path(tmp) / "prod_local.txt"
        note.write_text("written by the client straight to the object store\n")
        mlflow.log_artifact(str(note))
        return f"{run.info.artifact_uri}/prod_local.txt"


def _serve(stack: ProdLocalStack) -> None:
    cmd = [str(Path(sys.executable).with_name("dagster")), "dev", "-m", "orchestration.definitions",
           "-h", "127.0.0.1", "-p", os.environ.get("DAGSTER_PORT", "3000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **stack.env}, start_new_session=True)
    print(f"Dagster UI on the Postgres instance: http://127.0.0.1:{os.environ.get('DAGSTER_PORT', '3000')}   "
          f"MLflow: {stack.mlflow_url}   (Ctrl-C stops everything)", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # dagster dev stops its webserver and daemon on SIGINT
            proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.prod_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="keep the state in this folder (default: a temp folder, deleted on exit)")
    parser.add_argument("--images-only", action="store_true", help="sample corpus without videos (faster)")
    parser.add_argument("--serve", action="store_true", help="then serve the Dagster UI until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = parser.parse_args(argv)
    with ExitStack() as cleanup:
        root = Path(args.root) if args.root else Path(cleanup.enter_context(tempfile.TemporaryDirectory(
            prefix="k5-prod-local-")))
        stack = cleanup.enter_context(prod_local_stack(root, images_only=args.images_only))
        summary = run_curation_stage(stack)
        ok = all(summary["shard_runs"].values()) and summary["dataset_run"] and all(summary["checks"].values())
        summary["ok"] = ok
        if args.json:
            print(json.dumps(summary, default=str), flush=True)
        else:
            print(f"curation through Postgres + S3 + Ray: {'OK' if ok else 'FAILED'}; {summary['rows']} rows at "
                  f"{summary['path']}; runs in Postgres {summary['postgres_runs']}; MLflow artifact "
                  f"{summary['mlflow_artifact']}", flush=True)
        if args.serve:
            _serve(stack)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

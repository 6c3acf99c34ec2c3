"""Dagster resources, all in this module: local state paths, MLflow tracking, the object store, and where curation
reads and writes.

Unset fields resolve from ``orchestration.settings`` when a run uses them (not at import), so one ``defs`` works for
``make demo``, ``dagster dev`` and tests that point ``K5_HOME`` at a tmp dir.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from orchestration.settings import K5Paths, offline_env
from orchestration.training_jobs import (
    BACKENDS,
    PYTORCHJOB_API,
    build_pytorchjob,
    build_training_pod_spec,
    pytorchjob_name,
    training_command,
    wait_for_pytorchjob,
)

if TYPE_CHECKING:
    import mlflow

    from k5data.curation.config import CurationConfig
    from k5data.curation.ray_exec import ShardExecutor
    from k5data.object_store import LocalStore, S3Store
    from k5data.sources import Source
    from k5model.training.job import TrainJob

offline_env()  # before anything imports mlflow: its telemetry client reads the env at start-up

MLFLOW_UI_URL = "http://127.0.0.1:5000"


class K5HomeResource(dg.ConfigurableResource):
    """The local-state folder (see ``K5Paths``). ``home`` unset: ``$K5_HOME`` or ``<repo>/.k5``."""

    home: str | None = None

    @property
    def paths(self) -> K5Paths:
        paths = K5Paths(Path(self.home).expanduser().resolve()) if self.home else K5Paths.from_env()
        return paths.ensure()


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking on the SQLite store under K5_HOME by default; artifacts go to ``<K5_HOME>/mlartifacts``."""

    tracking_uri: str | None = None
    artifact_location: str | None = None  # folder or URI; the experiment's artifacts live in <this>/<experiment>
    experiment_name: str = "k5-lifecycle"
    ui_url: str = MLFLOW_UI_URL

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or K5Paths.from_env().ensure().mlflow_tracking_uri

    def _artifact_root(self) -> str | None:
        loc = self.artifact_location
        if not loc:
            if self.tracking_uri and not self.tracking_uri.startswith("sqlite:"):
                return None  # a tracking server picks (and proxies) the artifact store itself
            loc = str(K5Paths.from_env().ensure().mlflow_artifacts)
        if "://" in loc:
            return loc.rstrip("/")
        return Path(loc).expanduser().resolve().as_uri()

    def experiment_id(self) -> str:
        """Id of ``experiment_name``, created (with its artifact location) if missing."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.resolved_tracking_uri())
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        root = self._artifact_root()
        location = f"{root}/{self.experiment_name}" if root else None
        return client.create_experiment(self.experiment_name, artifact_location=location)

    @contextmanager
    def start_run(
        self, name: str, *, nested: bool = False, tags: dict[str, str] | None = None
    ) -> Iterator[mlflow.ActiveRun]:
        """``with mlflow_resource.start_run("x") as run: mlflow.log_param(...)``. The fluent API needs a global
        tracking URI: it is set for the run and restored afterwards, so other code in the process is unaffected."""
        import mlflow

        previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(self.resolved_tracking_uri())
        try:
            exp_id = self.experiment_id()
            with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=nested, tags=tags) as run:
                yield run
        finally:
            if previous is not None:
                mlflow.set_tracking_uri(previous)

    def run_url(self, run: Any) -> str:
        """Link to a run (``ActiveRun`` or ``Run``) in the MLflow UI (``make ui``)."""
        info = run.info
        return f"{self.ui_url.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"

    # --- training stages: one run per stage, nested under one lineage run per chain and Dagster run ---------------

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.resolved_tracking_uri())

    def lineage_run_id(self, chain: str, dagster_run_id: str) -> str:
        """The parent run of ``chain`` for this Dagster run (created on first use; every stage run nests under it)."""
        client, exp = self._client(), self.experiment_id()
        found = client.search_runs([exp], filter_string=f"tags.k5_lineage = '{chain}' and "
                                   f"tags.dagster_run_id = '{dagster_run_id}'", max_results=1)
        if found:
            return found[0].info.run_id
        run = client.create_run(exp, run_name=f"{chain} lineage",
                                tags={"k5_lineage": chain, "dagster_run_id": dagster_run_id})
        return run.info.run_id

    def start_stage_run(self, chain: str, stage: str, dagster_run_id: str, params: dict[str, Any],
                        tags: dict[str, str] | None = None) -> str:
        """Create the stage's run (status RUNNING) under the chain's lineage run (set RUNNING again), with ``params``
        (the stage config) and ``tags`` (links back to Dagster, data lineage).

        Returns its id: the training job resumes it (``K5_MLFLOW_RUN_ID``) and logs step metrics, system metrics,
        samples and the exported checkpoint into it live; ``end_stage_run`` closes it and its lineage run."""
        from mlflow.entities import Param, RunStatus

        client = self._client()
        parent = self.lineage_run_id(chain, dagster_run_id)
        client.update_run(parent, status=RunStatus.to_string(RunStatus.RUNNING))
        run = client.create_run(self.experiment_id(), run_name=stage,
                                tags={"mlflow.parentRunId": parent, "k5_stage": stage, "k5_chain": chain,
                                      "dagster_run_id": dagster_run_id, **(tags or {})})
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        return run.info.run_id

    def end_stage_run(self, run_id: str, *, failed: bool = False, tags: dict[str, str] | None = None) -> str:
        """Mark a stage run FAILED (``failed``), or FINISHED if the job left it RUNNING, and its lineage run the same
        (a later stage of the chain sets the lineage run RUNNING again); ``tags`` are set first. Returns its link."""
        client = self._client()
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
        run = client.get_run(run_id)
        if failed:
            client.set_terminated(run_id, status="FAILED")
        elif run.info.status == "RUNNING":
            client.set_terminated(run_id, status="FINISHED")
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
        return self.run_url(run)


class ObjectStoreResource(dg.ConfigurableResource):
    """Blob store for pipeline outputs (media, previews, curated Parquet, latent shards): the ``k5data.object_store``
    implementations. ``base_uri`` unset: the folder ``<K5_HOME>/objects``; a path or ``file://`` URI: that folder;
    ``s3://bucket/prefix``: S3 or any S3-compatible store at ``endpoint_url`` (unset: ``$K5_S3_ENDPOINT_URL``)."""

    base_uri: str | None = None
    endpoint_url: str | None = None

    def store(self) -> LocalStore | S3Store:
        """The underlying store (``put_file``/``get_file``/``open_read``/``exists``/``list``/``uri``), e.g. for
        ``k5data.latents.shards.write_shards``."""
        from k5data.object_store import open_store

        return open_store(self.base_uri or K5Paths.from_env().ensure().object_store, self.endpoint_url)

    @staticmethod
    def _check_key(key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid object key {key!r}: use a relative path like 'demo/run/video_00.mp4'")
        return key

    def put_file(self, local: str | Path, key: str) -> str:
        """Copy a local file to ``key``; returns its URI."""
        return self.store().put_file(Path(local), self._check_key(key))

    def get_file(self, key: str, local: str | Path) -> Path:
        """Copy object ``key`` to the local path ``local``; returns it."""
        return self.store().get_file(self._check_key(key), Path(local))

    def uri(self, key: str) -> str:
        return self.store().uri(self._check_key(key))

    def exists(self, key: str) -> bool:
        return self.store().exists(self._check_key(key))


class CurationResource(dg.ConfigurableResource):
    """Where curation reads and writes. ``source`` unset: the sample corpus, built under ``<K5_HOME>/corpus``.
    ``out`` unset: the object store resource (``curation/`` prefix); or a folder / ``s3://`` URI written directly.
    ``config_path``: YAML merged over ``k5data/curation/configs/curation.yaml``; ``endpoint_url``: S3-compatible
    store. ``ray_address`` set: each shard's registration and scoring run as Ray tasks on that cluster (retried when
    a worker dies; the catalog under the K5 home must then be on a volume every Ray worker mounts at the same path);
    unset: in the run's process. ``ray_num_cpus`` / ``ray_num_gpus``: what one such task reserves."""

    source: str | None = None
    out: str | None = None
    config_path: str | None = None
    endpoint_url: str | None = None
    ray_address: str | None = None
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0

    def executor(self) -> ShardExecutor:
        """Where per-shard calls run: a ``RayExecutor`` when ``ray_address`` is set, else this process."""
        from k5data.curation.ray_exec import InProcessExecutor, RayExecutor

        if self.ray_address:
            return RayExecutor(address=self.ray_address, num_cpus=self.ray_num_cpus, num_gpus=self.ray_num_gpus)
        return InProcessExecutor()

    def run_shard_step(self, home: K5HomeResource, step: str, shard: int) -> dict[str, Any]:
        """``register`` or ``score`` one source shard into the catalog under ``home`` on ``executor()``; returns its
        counts (see ``k5data.curation.ray_exec.run_shard_work``)."""
        from k5data.curation.ray_exec import ShardWork, run_shard_work

        work = ShardWork(step=step, source_root=self.resolved_source(home), catalog_path=str(home.paths.catalog_db),
                         cfg=dict(self.config()), shard=shard)
        return self.executor().map(run_shard_work, [work])[0]

    def config(self) -> CurationConfig:
        from k5data.curation.config import load_config

        return load_config(self.config_path, {"s3": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else None)

    def resolved_source(self, home: K5HomeResource) -> str:
        if self.source:
            return self.source
        from k5data.curation.corpus import build_sample_corpus

        folder = home.paths.home / "corpus" / "sample"
        if not (folder / "bikes.mp4").exists():
            build_sample_corpus(folder)
        return str(folder)

    def open_source(self, home: K5HomeResource) -> Source:
        from k5data.sources import Source

        cfg = self.config()
        return Source(self.resolved_source(home), cfg.endpoint_url, cfg.section("s3")["region"], retry=cfg.retry_policy)


class TrainingJobResource(dg.ConfigurableResource):
    """Launches ``orchestration.pipes_train`` through Dagster Pipes: ``backend="subprocess"`` on this machine,
    ``backend="k8s"`` as a GPU pod through ``dagster_k8s.PipesK8sClient``.

    ``from_env()`` reads ``K5_PIPES`` (subprocess | k8s), ``K5_TRAIN_IMAGE``, ``K5_K8S_NAMESPACE``,
    ``K5_GPUS_PER_POD``, ``K5_NPROC_PER_NODE``, ``K5_HOME_PVC``, ``K5_K8S_SECRET``, ``K5_K8S_SERVICE_ACCOUNT``,
    ``K5_TRAIN_NODES``. The processes of a job are the job's own (``TrainJob.parallel.nproc``); ``default_nproc`` is
    what a stage asset puts there when its config names none. ``nodes`` > 1 on Kubernetes: one Kubeflow PyTorchJob of
    that many pods (``training_jobs.build_pytorchjob``) instead of one pod; its Pipes messages come back through a file
    under the shared K5 home."""

    backend: str = "subprocess"
    nproc_per_node: int | None = None  # default: 1 locally, gpus_per_pod on Kubernetes
    image: str | None = None
    namespace: str = "default"
    gpus_per_pod: int = 8
    cpu: str | None = None
    memory: str | None = None
    shm_size: str = "64Gi"
    k5_home_pvc: str | None = None
    k5_home_mount: str | None = None  # default: this process's K5 home, so paths in the command resolve in the pod
    secret_env: str | None = None
    service_account: str | None = None
    node_selector: dict[str, str] = {}
    load_incluster_config: bool | None = None
    kubeconfig_file: str | None = None
    pod_wait_timeout_s: float = 0.0  # 0 = wait without limit (a full stage runs for days)
    nodes: int = 1  # k8s: >1 runs a PyTorchJob of this many pods (each nproc/nodes GPUs), c10d rendezvous
    nccl_env: dict[str, str] = {}  # over training_jobs.NCCL_ENV, e.g. {"NCCL_IB_HCA": "mlx5"} on InfiniBand
    backoff_limit: int = 3  # PyTorchJob: pod restarts in all before the job fails (each resumes from a checkpoint)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrainingJobResource:
        env = os.environ if environ is None else environ
        backend = env.get("K5_PIPES", "subprocess").strip().lower()
        if backend not in BACKENDS:
            raise ValueError(f"K5_PIPES={env.get('K5_PIPES')!r} is not one of {BACKENDS}")
        fields: dict[str, Any] = {"backend": backend}
        for var, name, cast in (("K5_TRAIN_IMAGE", "image", str), ("K5_K8S_NAMESPACE", "namespace", str),
                                ("K5_GPUS_PER_POD", "gpus_per_pod", int), ("K5_NPROC_PER_NODE", "nproc_per_node", int),
                                ("K5_HOME_PVC", "k5_home_pvc", str), ("K5_K8S_SECRET", "secret_env", str),
                                ("K5_K8S_SERVICE_ACCOUNT", "service_account", str), ("K5_TRAIN_NODES", "nodes", int)):
            if env.get(var):
                try:
                    fields[name] = cast(env[var])
                except ValueError as err:
                    raise ValueError(f"{var}={env[var]!r} is not a valid {cast.__name__}") from err
        return cls(**fields)

    def default_nproc(self) -> int:
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return max(self.gpus_per_pod, 1) * max(self.nodes, 1) if self.backend == "k8s" else 1

    def _home(self) -> str:
        return self.k5_home_mount or str(K5Paths.from_env().home)

    def _pod_settings(self) -> dict[str, Any]:
        return dict(image=self.image or "", k5_home=self._home(), k5_home_pvc=self.k5_home_pvc or "", cpu=self.cpu,
                    memory=self.memory, shm_size=self.shm_size, secret_env=self.secret_env,
                    service_account=self.service_account, node_selector=self.node_selector)

    def pod_spec(self, job: TrainJob, env: Mapping[str, str]) -> dict[str, Any]:
        """The Kubernetes pod spec this resource would launch for ``job`` (see ``build_training_pod_spec``)."""
        return self._pod_spec(training_command(job, python="python"), env, job.parallel.nproc)

    def _pod_spec(self, command: list[str], env: Mapping[str, str], gpus: int) -> dict[str, Any]:
        return build_training_pod_spec(command=command, env={**env, "K5_HOME": self._home()}, gpus=gpus,
                                       **self._pod_settings())

    def pytorchjob(self, job: TrainJob, env: Mapping[str, str], name: str) -> dict[str, Any]:
        """The PyTorchJob this resource would create for ``job`` on ``nodes`` nodes (see ``build_pytorchjob``)."""
        return build_pytorchjob(name=name, namespace=self.namespace, job=job, nodes=self.nodes,
                                pod_settings=self._pod_settings(), env={**env, "K5_HOME": self._home()},
                                nccl_env=self.nccl_env, backoff_limit=self.backoff_limit)

    def _custom_objects_api(self) -> Any:
        import kubernetes

        if self.load_incluster_config or (self.load_incluster_config is None
                                          and os.environ.get("KUBERNETES_SERVICE_HOST")):
            kubernetes.config.load_incluster_config()
        else:
            kubernetes.config.load_kube_config(self.kubeconfig_file)
        return kubernetes.client.CustomObjectsApi()

    def run_pytorchjob(self, context: dg.AssetExecutionContext, job: TrainJob, env: Mapping[str, str], *,
                       submit: Callable[[dict[str, Any]], None] | None = None,
                       wait: Callable[[str], str] | None = None) -> dg.PipesClientCompletedInvocation:
        """Run ``job`` as a PyTorchJob of ``nodes`` pods and block until it ends (``dg.Failure`` unless it succeeded),
        reading the Pipes messages its rank 0 writes to ``<K5 home>/pipes/<job name>.jsonl`` meanwhile.

        ``submit(manifest)`` / ``wait(name) -> "Succeeded" | "Failed"`` default to the Kubernetes API (create the
        custom object; poll its status); another launcher of the same manifest can be passed instead."""
        if submit is None or wait is None:
            api = self._custom_objects_api()
            group, version, plural = PYTORCHJOB_API
            submit = submit or (lambda manifest: api.create_namespaced_custom_object(
                group, version, self.namespace, plural, manifest))
            wait = wait or (lambda name: wait_for_pytorchjob(api, self.namespace, name,
                                                             timeout_s=self.pod_wait_timeout_s))
        name = pytorchjob_name(job.stage.stage, context.run_id, context.retry_number)
        # The pods write Pipes messages into a file on the shared K5 home; this process reads it while they run.
        messages = Path(self._home()) / "pipes" / f"{name}.jsonl"
        messages.parent.mkdir(parents=True, exist_ok=True)
        with dg.open_pipes_session(context=context, context_injector=dg.PipesEnvContextInjector(),
                                   message_reader=dg.PipesFileMessageReader(str(messages))) as session:
            manifest = self.pytorchjob(job, {**env, **session.get_bootstrap_env_vars()}, name)
            master = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
            context.log.info(f"training job (PyTorchJob {self.namespace}/{name}, {self.nodes} nodes): "
                             f"{shlex.join(master['command'])}")
            submit(manifest)
            state = wait(name)
            if state != "Succeeded":
                raise dg.Failure(f"PyTorchJob {self.namespace}/{name} ended {state}: "
                                 f"kubectl -n {self.namespace} describe pytorchjob {name}; logs of its pods")
        return dg.PipesClientCompletedInvocation(session)

    def run(self, context: dg.AssetExecutionContext, job: TrainJob,
            env: Mapping[str, str]) -> dg.PipesClientCompletedInvocation:
        """Run one stage; blocks until the job ends (raises if it fails), streaming its Pipes messages meanwhile."""
        if self.backend == "k8s" and self.nodes > 1:
            return self.run_pytorchjob(context, job, env)
        return self.run_command(context, training_command, job, env, gpus=job.parallel.nproc, label="k5-train")

    def run_command(self, context: dg.AssetExecutionContext, command: Callable[..., list[str]], job: Any,
                    env: Mapping[str, str], *, gpus: int, label: str) -> dg.PipesClientCompletedInvocation:
        """Run ``command(job, python=...)`` once through Pipes on this backend: a local subprocess, or one pod with
        ``gpus`` GPUs and this resource's pod settings. Stages and the RL jobs launch through here."""
        if self.backend == "subprocess":
            cmd = command(job)
            context.log.info(f"training job (subprocess): {shlex.join(cmd)}")
            return dg.PipesSubprocessClient().run(context=context, command=cmd, env=dict(env))
        if self.backend == "k8s":
            from dagster_k8s import PipesK8sClient

            spec = self._pod_spec(command(job, python="python"), env, gpus)
            context.log.info(f"training job (k8s, namespace {self.namespace}): "
                             f"{shlex.join(spec['containers'][0]['command'])}")
            client = PipesK8sClient(load_incluster_config=self.load_incluster_config,
                                    kubeconfig_file=self.kubeconfig_file)
            return client.run(context=context, namespace=self.namespace, base_pod_spec=spec,
                              base_pod_meta={"labels": {"app.kubernetes.io/name": label}},
                              pod_wait_timeout=self.pod_wait_timeout_s)
        raise ValueError(f"TrainingJobResource.backend={self.backend!r} is not one of {BACKENDS}")


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resource set of ``defs``; everything resolves from K5_HOME at run time. ``K5_DEPLOYMENT=production``:
    ``orchestration.production.production_resources()`` (object store, MLflow server, Ray, from the environment)."""
    from orchestration.production import is_production, production_resources

    if is_production():
        return production_resources()
    return {"k5_home": K5HomeResource(), "mlflow": MLflowResource(), "object_store": ObjectStoreResource(),
            "training_job": TrainingJobResource.from_env(),
            "curation": CurationResource()}

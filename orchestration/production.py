"""The production resource set and executor, from ONE set of environment variables (a ConfigMap ``k5-settings`` and
a Secret ``k5-object-store`` on Kubernetes; ``orchestration.prod_local`` sets the same variables on one machine).

``K5_DEPLOYMENT=production`` makes ``orchestration.resources.default_resources`` return ``production_resources()``:

- ``K5_OBJECT_STORE``: ``s3://bucket[/prefix]``: curated dataset (``curation/``), latent shards, releases, and MLflow
  artifacts (``mlflow/``: written by the clients straight to the store, registered by reference, never proxied);
- ``K5_S3_ENDPOINT_URL``: S3-compatible endpoint (MinIO, moto); MLflow's ``MLFLOW_S3_ENDPOINT_URL`` is set from it;
- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``: object-store credentials (Secret only);
- ``MLFLOW_TRACKING_URI``: the MLflow server (Postgres backend);
- ``K5_RAY_ADDRESS``: Ray cluster for per-shard curation (unset: in the run's process);
- ``K5_CURATION_SOURCE``: folder or ``s3://`` prefix to curate (unset: the sample corpus under ``K5_HOME``);
- ``K5_PIPES``, ``K5_TRAIN_*``, ``K5_K8S_*``, ``K5_HOME_PVC``: training stages (``TrainingJobResource.from_env``);
- ``K5_EXECUTOR``: ``k8s`` runs each step in its own pod (``k8s_job_executor``), GPU steps sized by op tags.

Checkpoints live in the run folders under ``K5_HOME`` (a ReadWriteMany volume mounted in every pod at the same path);
what a stage publishes goes to the object store through the release.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

from orchestration.resources import (
    CurationResource,
    K5HomeResource,
    MLflowResource,
    ObjectStoreResource,
    TrainingJobResource,
)
from orchestration.training_jobs import GPU_RESOURCE

PRODUCTION = "production"
SETTINGS_CONFIG_MAP = "k5-settings"  # non-secret variables above
OBJECT_STORE_SECRET = "k5-object-store"  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
MLFLOW_PREFIX = "mlflow"  # MLflow artifacts under the one object store


def is_production(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("K5_DEPLOYMENT", "").strip().lower() == PRODUCTION


def production_resources(environ: Mapping[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources of a shared deployment; raises ``ValueError`` naming every missing or bad variable."""
    env = os.environ if environ is None else environ
    problems = []
    store = env.get("K5_OBJECT_STORE", "").rstrip("/")
    if not store.startswith("s3://") or len(store) <= len("s3://"):
        problems.append(f"K5_OBJECT_STORE={store!r} must be s3://bucket[/prefix] (the one object store)")
    tracking = env.get("MLFLOW_TRACKING_URI", "")
    if not tracking.startswith(("http://", "https://")):
        problems.append(f"MLFLOW_TRACKING_URI={tracking!r} must be the MLflow server's http(s) URL "
                        "(a SQLite file cannot be shared by pods)")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not env.get(var):
            problems.append(f"{var} is not set (from the {OBJECT_STORE_SECRET} Secret)")
    if problems:
        raise ValueError("production settings (K5_DEPLOYMENT=production): " + "; ".join(problems))
    endpoint = env.get("K5_S3_ENDPOINT_URL") or None
    if endpoint and environ is None:
        # MLflow clients write artifacts straight to the store (--no-serve-artifacts): same endpoint as ours.
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
    return {
        "k5_home": K5HomeResource(),
        "object_store": ObjectStoreResource(base_uri=store, endpoint_url=endpoint),
        "curation": CurationResource(endpoint_url=endpoint, ray_address=env.get("K5_RAY_ADDRESS") or None,
                                     source=env.get("K5_CURATION_SOURCE") or None),
        "mlflow": MLflowResource(tracking_uri=tracking, artifact_location=f"{store}/{MLFLOW_PREFIX}",
                                 ui_url=env.get("K5_MLFLOW_UI_URL", tracking)),
        "training_job": TrainingJobResource.from_env(env),
    }


def gpu_op_tags(gpus: int = 1) -> dict[str, Any]:
    """Op tags giving a step's pod ``gpus`` GPUs under ``k8s_job_executor`` (ignored by the in-process executors)."""
    limits = {GPU_RESOURCE: str(gpus)}
    return {"dagster-k8s/config": {
        "container_config": {"resources": {"requests": dict(limits), "limits": dict(limits)}},
        "pod_spec_config": {"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]}}}


def step_pod_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``k8s_job_executor`` config of a deployment: settings and credentials from the ConfigMap and Secret, the K5
    home claim mounted, at most ``K5_MAX_STEP_PODS`` step pods per run."""
    env = os.environ if environ is None else environ
    config: dict[str, Any] = {"env_config_maps": [SETTINGS_CONFIG_MAP], "env_secrets": [OBJECT_STORE_SECRET],
                              "max_concurrent": int(env.get("K5_MAX_STEP_PODS", "8"))}
    if env.get("K5_K8S_NAMESPACE"):
        config["job_namespace"] = env["K5_K8S_NAMESPACE"]
    if env.get("K5_HOME_PVC"):
        config["volumes"] = [{"name": "k5-home", "persistentVolumeClaim": {"claimName": env["K5_HOME_PVC"]}}]
        config["volume_mounts"] = [{"name": "k5-home", "mountPath": env.get("K5_HOME", "/k5")}]
    return config


def production_executor(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """``K5_EXECUTOR=k8s``: ``k8s_job_executor`` with ``step_pod_config`` (one pod per step; GPU steps sized by
    their ``dagster-k8s/config`` op tags, see ``gpu_op_tags``); else None (the default executor: steps in the run's
    pod)."""
    env = os.environ if environ is None else environ
    choice = env.get("K5_EXECUTOR", "").strip().lower()
    if choice in ("", "default"):
        return None
    if choice != "k8s":
        raise ValueError(f"K5_EXECUTOR={choice!r} is not 'k8s' or unset")
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(step_pod_config(env), name="k5_k8s_job_executor")

"""How a training stage runs as an external job through Dagster Pipes: a local subprocess (default) or a Kubernetes
GPU pod (``PipesK8sClient``), chosen by ``TrainingJobResource.backend`` (``$K5_PIPES`` in ``default_resources``).

Both run the same command, ``python -m orchestration.pipes_train --job <TrainJob JSON>``, under ``torchrun`` when the
job asks for more than one process (``TrainJob.parallel.nproc``, also the pod's GPU count). The pod spec is built by a pure function, ``build_training_pod_spec``
(tested against the kubernetes client models without a cluster; ``infra/k8s/training-pod.yaml`` is its rendering).

Kubernetes assumptions (see infra/k8s/README.md): one pod = one node's GPUs (multi-node needs a JobSet / PyTorchJob
and is not built); the K5 home (run folders, parent checkpoints, validation prompts, pipeline folders) is a
ReadWriteMany volume mounted in the pod at the same path the Dagster process uses, so the paths in the command resolve
in both; MLflow is a tracking server the pod can reach (a SQLite store does not work across machines).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from k5model.training.job import TrainJob

BACKENDS = ("subprocess", "k8s")
GPU_RESOURCE = "nvidia.com/gpu"


def training_command(job: TrainJob, *, python: str = sys.executable) -> list[str]:
    """The job's command: ``python -m orchestration.pipes_train --job JSON``, or torchrun with
    ``job.parallel.nproc`` workers (rank 0 talks to Dagster and MLflow, the others only train)."""
    args = ["-m", "orchestration.pipes_train", "--job", job.to_json()]
    if job.parallel.nproc == 1:
        return [python, *args]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(job.parallel.nproc), *args]


def build_training_pod_spec(
    *,
    image: str,
    command: Sequence[str],
    env: Mapping[str, str],
    gpus: int,
    k5_home: str,
    k5_home_pvc: str,
    cpu: str | None = None,
    memory: str | None = None,
    shm_size: str = "64Gi",
    secret_env: str | None = None,
    service_account: str | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerate_gpu_taint: bool = True,
) -> dict[str, Any]:
    """Pod spec (Kubernetes camelCase, as in YAML) of one training job; pass it to ``PipesK8sClient.run`` as
    ``base_pod_spec`` (Dagster adds its Pipes env vars to the first container).

    ``gpus`` GPUs as ``nvidia.com/gpu`` requests = limits; ``k5_home_pvc`` mounted at ``k5_home`` (the same path as
    on the Dagster side); a memory-backed ``/dev/shm`` of ``shm_size`` (NCCL and data workers need more than the
    64 MiB default); ``secret_env``: a Secret whose keys become env vars (object store / MLflow credentials)."""
    problems = []
    if not image:
        problems.append("image is empty (set K5_TRAIN_IMAGE or TrainingJobResource.image)")
    if gpus < 0:
        problems.append(f"gpus={gpus} must be >= 0")
    if not k5_home.startswith("/"):
        problems.append(f"k5_home={k5_home!r} must be an absolute path")
    if not k5_home_pvc:
        problems.append("k5_home_pvc is empty (set K5_HOME_PVC: the claim holding the K5 home)")
    if not command:
        problems.append("command is empty")
    if problems:
        raise ValueError("invalid training pod settings: " + "; ".join(problems))
    limits: dict[str, str] = {GPU_RESOURCE: str(gpus)} if gpus else {}
    if cpu:
        limits["cpu"] = cpu
    if memory:
        limits["memory"] = memory
    container: dict[str, Any] = {
        "name": "trainer",
        "image": image,
        "command": list(command),
        "env": [{"name": k, "value": str(v)} for k, v in sorted(env.items())],
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        "volumeMounts": [{"name": "k5-home", "mountPath": k5_home}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if secret_env:
        container["envFrom"] = [{"secretRef": {"name": secret_env}}]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",  # a failed stage is retried by Dagster (it resumes from its last checkpoint)
        "containers": [container],
        "volumes": [
            {"name": "k5-home", "persistentVolumeClaim": {"claimName": k5_home_pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        ],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerate_gpu_taint and gpus:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return spec


class TrainingJobResource(dg.ConfigurableResource):
    """Launches ``orchestration.pipes_train`` through Dagster Pipes: ``backend="subprocess"`` on this machine,
    ``backend="k8s"`` as a GPU pod through ``dagster_k8s.PipesK8sClient``.

    ``from_env()`` reads ``K5_PIPES`` (subprocess | k8s), ``K5_TRAIN_IMAGE``, ``K5_K8S_NAMESPACE``,
    ``K5_GPUS_PER_POD``, ``K5_NPROC_PER_NODE``, ``K5_HOME_PVC``, ``K5_K8S_SECRET``, ``K5_K8S_SERVICE_ACCOUNT``.
    The processes of a job are the job's own (``TrainJob.parallel.nproc``); ``default_nproc`` is what a stage asset
    puts there when its config names none."""

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
                                ("K5_K8S_SERVICE_ACCOUNT", "service_account", str)):
            if env.get(var):
                try:
                    fields[name] = cast(env[var])
                except ValueError as err:
                    raise ValueError(f"{var}={env[var]!r} is not a valid {cast.__name__}") from err
        return cls(**fields)

    def default_nproc(self) -> int:
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return max(self.gpus_per_pod, 1) if self.backend == "k8s" else 1

    def pod_spec(self, job: TrainJob, env: Mapping[str, str]) -> dict[str, Any]:
        """The Kubernetes pod spec this resource would launch for ``job`` (see ``build_training_pod_spec``)."""
        from orchestration.settings import K5Paths

        home = self.k5_home_mount or str(K5Paths.from_env().home)
        return build_training_pod_spec(
            image=self.image or "", command=training_command(job, python="python"),
            env={**env, "K5_HOME": home}, gpus=job.parallel.nproc, k5_home=home, k5_home_pvc=self.k5_home_pvc or "",
            cpu=self.cpu, memory=self.memory, shm_size=self.shm_size, secret_env=self.secret_env,
            service_account=self.service_account, node_selector=self.node_selector)

    def run(self, context: dg.AssetExecutionContext, job: TrainJob,
            env: Mapping[str, str]) -> dg.PipesClientCompletedInvocation:
        """Run one stage; blocks until the job ends (raises if it fails), streaming its Pipes messages meanwhile."""
        if self.backend == "subprocess":
            cmd = training_command(job)
            context.log.info(f"training job (subprocess): {shlex.join(cmd)}")
            return dg.PipesSubprocessClient().run(context=context, command=cmd, env=dict(env))
        if self.backend == "k8s":
            from dagster_k8s import PipesK8sClient

            spec = self.pod_spec(job, env)
            context.log.info(f"training job (k8s, namespace {self.namespace}): "
                             f"{shlex.join(spec['containers'][0]['command'])}")
            client = PipesK8sClient(load_incluster_config=self.load_incluster_config,
                                    kubeconfig_file=self.kubeconfig_file)
            return client.run(context=context, namespace=self.namespace, base_pod_spec=spec,
                              base_pod_meta={"labels": {"app.kubernetes.io/name": "k5-train"}},
                              pod_wait_timeout=self.pod_wait_timeout_s)
        raise ValueError(f"TrainingJobResource.backend={self.backend!r} is not one of {BACKENDS}")


# Settings of the checked-in template infra/k8s/training-pod.yaml (kept equal to this rendering by the tests).
EXAMPLE = {"image": "registry.example.com/k5-lifecycle:latest", "gpus": 8, "k5_home": "/k5", "k5_home_pvc": "k5-home",
           "secret_env": "k5-object-store", "service_account": "k5-trainer",
           "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
EXAMPLE_JOB = TrainJob.from_flat(
    stage="video_lite_mr_5s", bf16=True, shards="latents", store="s3://k5-objects", res_classes="medium",
    text_encoders="/k5/models/kandinsky5lite_t2v", nproc=EXAMPLE["gpus"], activation_checkpointing=True,
    out="/k5/models/training/.video_lite_mr_5s.partial", resume=True, ckpt_every=500,
    base_pipeline="/k5/models/kandinsky5lite_t2v", sample_every=1000,
    sample_pipeline="/k5/models/kandinsky5lite_t2v",
    sample_prompts="/k5/models/training/.video_lite_mr_5s.partial/validation_prompts.txt", sample_steps=50,
    sample_cache="/k5/cache/sample_text", init="/k5/models/training/video_lite_lr/ema/transformer")


def example_pod_manifest() -> dict[str, Any]:
    """A standalone Pod manifest of one 8-GPU stage (what ``PipesK8sClient`` submits, minus the Pipes env vars and
    labels Dagster adds at launch)."""
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.k5.svc.cluster.local:5000", "K5_HOME": EXAMPLE["k5_home"]}
    spec = build_training_pod_spec(
        image=EXAMPLE["image"], command=training_command(EXAMPLE_JOB, python="python"),
        env=env, gpus=EXAMPLE["gpus"], k5_home=EXAMPLE["k5_home"], k5_home_pvc=EXAMPLE["k5_home_pvc"],
        secret_env=EXAMPLE["secret_env"], service_account=EXAMPLE["service_account"],
        node_selector=EXAMPLE["node_selector"])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "k5-train-", "labels": {"app.kubernetes.io/name": "k5-train"}}, "spec": spec}


if __name__ == "__main__":  # python -m orchestration.training_jobs > infra/k8s/training-pod.yaml
    import yaml

    print("# Generated by `python -m orchestration.training_jobs` (orchestration/training_jobs.py"
          " build_training_pod_spec).\n# Dagster's PipesK8sClient submits this spec with its Pipes env vars added;"
          " see infra/k8s/README.md.")
    print(yaml.safe_dump(example_pod_manifest(), sort_keys=False), end="")

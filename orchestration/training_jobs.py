"""How a training stage runs as an external job through Dagster Pipes: a local subprocess (default) or a Kubernetes GPU
pod (``PipesK8sClient``), chosen by ``orchestration.resources.TrainingJobResource.backend`` (``$K5_PIPES`` in
``default_resources``).

Both run the same command, ``python -m orchestration.pipes_train --job <TrainJob JSON>``, under ``torchrun`` when the
job asks for more than one process (``TrainJob.parallel.nproc``, also the pod's GPU count). The pod spec is built by a
pure function, ``build_training_pod_spec`` (tested against the kubernetes client models without a cluster;
``infra/k8s/training-pod.yaml`` is its rendering).

Kubernetes assumptions (see infra/k8s/README.md): one pod = one node's GPUs (multi-node needs a JobSet / PyTorchJob
and is not built); the K5 home (run folders, parent checkpoints, validation prompts, pipeline folders) is a
ReadWriteMany volume mounted in the pod at the same path the Dagster process uses, so the paths in the command resolve
in both; MLflow is a tracking server the pod can reach (a SQLite store does not work across machines).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

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

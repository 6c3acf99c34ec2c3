"""How a training stage runs as an external job through Dagster Pipes: a local subprocess (default) or a Kubernetes GPU
pod (``PipesK8sClient``), chosen by ``orchestration.resources.TrainingJobResource.backend`` (``$K5_PIPES`` in
``default_resources``).

Both run the same command, ``python -m orchestration.pipes_train --job <TrainJob JSON>``, under ``torchrun`` when the
job asks for more than one process (``TrainJob.parallel.nproc``, also the pod's GPU count). The pod spec is built by a
pure function, ``build_training_pod_spec`` (tested against the kubernetes client models without a cluster;
``infra/k8s/training-pod.yaml`` is its rendering).

Kubernetes: one node's GPUs run as one pod (``PipesK8sClient``); several nodes run as one Kubeflow ``PyTorchJob``
(training-operator v1, ``build_pytorchjob``: a Master and N-1 Worker pods, ``torchrun`` with c10d rendezvous at the
Master's service, restarted OnFailure; every restart resumes from the newest checkpoint in the run folder on the shared
volume), whose Pipes messages come back through a file on that volume. Assumptions (see infra/k8s/README.md): the K5
home (run folders, parent checkpoints, validation prompts, pipeline folders) is a
ReadWriteMany volume mounted in the pod at the same path the Dagster process uses, so the paths in the command resolve
in both; MLflow is a tracking server the pod can reach (a SQLite store does not work across machines).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from k5model.training.job import TrainJob

BACKENDS = ("subprocess", "k8s")
GPU_RESOURCE = "nvidia.com/gpu"


def training_command(job: TrainJob, *, python: str = sys.executable, nodes: int = 1,
                     rdzv_endpoint: str = "$(MASTER_ADDR):$(MASTER_PORT)", rdzv_id: str = "k5") -> list[str]:
    """The job's command: ``python -m orchestration.pipes_train --job JSON``, or torchrun with
    ``job.parallel.nproc`` workers (rank 0 talks to Dagster and MLflow, the others only train).

    ``nodes`` > 1: ``job.parallel.nproc`` processes over that many nodes (``nproc / nodes`` each) meeting through
    c10d rendezvous at ``rdzv_endpoint`` (default: the ``MASTER_ADDR``/``MASTER_PORT`` the training-operator sets,
    expanded by Kubernetes) under ``rdzv_id`` (unique per job)."""
    args = ["-m", "orchestration.pipes_train", "--job", job.to_json()]
    if nodes < 1 or job.parallel.nproc % nodes:
        raise ValueError(f"nproc={job.parallel.nproc} processes do not split over nodes={nodes} "
                         "(set nproc to nodes x processes per node)")
    if nodes > 1:
        return [python, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                "--nproc-per-node", str(job.parallel.nproc // nodes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id, *args]
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
    container_name: str = "trainer",
    restart_policy: str = "Never",
) -> dict[str, Any]:
    """Pod spec (Kubernetes camelCase, as in YAML) of one training job; pass it to ``PipesK8sClient.run`` as
    ``base_pod_spec`` (Dagster adds its Pipes env vars to the first container).

    ``gpus`` GPUs as ``nvidia.com/gpu`` requests = limits; ``k5_home_pvc`` mounted at ``k5_home`` (the same path as
    on the Dagster side); a memory-backed ``/dev/shm`` of ``shm_size`` (NCCL and data workers need more than the
    64 MiB default); ``secret_env``: a Secret whose keys become env vars (object store / MLflow credentials);
    ``container_name``: ``pytorch`` inside a PyTorchJob (the operator injects its env into that container)."""
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
        "name": container_name,
        "image": image,
        "command": list(command),
        "env": [{"name": k, "value": str(v)} for k, v in sorted(env.items())],
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        "volumeMounts": [{"name": "k5-home", "mountPath": k5_home}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if secret_env:
        container["envFrom"] = [{"secretRef": {"name": secret_env}}]
    spec: dict[str, Any] = {
        # Never for the single pod: Dagster retries the stage; OnFailure in a PyTorchJob. Either resumes from the last
        # checkpoint of the run folder.
        "restartPolicy": restart_policy,
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


# NCCL / torch.distributed settings of a multi-node job (overridable per cluster, e.g. NCCL_IB_HCA on InfiniBand).
NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    "NCCL_SOCKET_IFNAME": "eth0",  # the pod network interface for NCCL's bootstrap and socket transport
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a hung or dead peer fails the collective instead of blocking forever
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}
PYTORCHJOB_API = ("kubeflow.org", "v1", "pytorchjobs")  # group, version, plural of the training-operator CRD


def build_pytorchjob(
    *,
    name: str,
    namespace: str,
    job: TrainJob,
    nodes: int,
    pod_settings: Mapping[str, Any],
    env: Mapping[str, str],
    nccl_env: Mapping[str, str] | None = None,
    backoff_limit: int = 3,
    ttl_seconds_after_finished: int = 7 * 24 * 3600,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A Kubeflow ``PyTorchJob`` (kubeflow.org/v1) running ``job`` on ``nodes`` pods: one Master and ``nodes - 1``
    Workers, each with ``job.parallel.nproc / nodes`` GPUs (requests = limits) and torchrun processes meeting through
    c10d rendezvous at the Master's service (the operator sets ``MASTER_ADDR``/``MASTER_PORT`` in every pod).

    ``pod_settings``: the keyword arguments of ``build_training_pod_spec`` other than command, env, gpus,
    container name and restart policy (image, k5_home, k5_home_pvc, secret_env, ...). Failed pods restart
    (``OnFailure``, at most ``backoff_limit`` times in all); each restart re-forms the rendezvous and resumes from the
    newest checkpoint in the run folder (``job.checkpoint.out`` on the shared K5 home volume), so ``job`` must have
    ``resume`` set."""
    problems = []
    if nodes < 2:
        problems.append(f"nodes={nodes}: a PyTorchJob is for 2+ nodes (one node runs as a pod)")
    if not job.checkpoint.resume:
        problems.append("job.checkpoint.resume is False: a restarted pod would start from step 0")
    k5_home = str(pod_settings.get("k5_home", ""))
    if not job.checkpoint.out.startswith(k5_home.rstrip("/") + "/"):
        problems.append(f"run folder {job.checkpoint.out!r} is not on the shared volume mounted at {k5_home!r}")
    if problems:
        raise ValueError(f"invalid multi-node training job {name!r}: " + "; ".join(problems))
    command = training_command(job, python="python", nodes=nodes, rdzv_id=name)
    gpus_per_node = job.parallel.nproc // nodes
    template_labels = {"app.kubernetes.io/name": "k5-train", "k5.stage": job.stage.stage, **(labels or {})}
    spec = build_training_pod_spec(command=command, env={**NCCL_ENV, **(nccl_env or {}), **env}, gpus=gpus_per_node,
                                   container_name="pytorch", restart_policy="OnFailure", **pod_settings)

    def replica(count: int) -> dict[str, Any]:  # separate copies: no shared objects (YAML anchors) in the rendering
        return copy.deepcopy({"replicas": count, "restartPolicy": "OnFailure",
                              "template": {"metadata": {"labels": template_labels}, "spec": spec}})

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(template_labels)},
        "spec": {
            "nprocPerNode": str(gpus_per_node),
            "runPolicy": {"backoffLimit": backoff_limit, "cleanPodPolicy": "Running",
                          "ttlSecondsAfterFinished": ttl_seconds_after_finished},
            "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(nodes - 1)},
        },
    }


def pytorchjob_name(stage: str, run_id: str, attempt: int = 0) -> str:
    """A DNS-1035 name, unique per Dagster run and step attempt, short enough for the operator's
    ``<name>-worker-<i>`` services (63 characters)."""
    slug = "".join(c if c.isalnum() else "-" for c in stage.lower()).strip("-")[:32].rstrip("-")
    return f"k5-{slug}-{run_id[:8].lower()}-{attempt}"


def pytorchjob_state(obj: Mapping[str, Any]) -> str | None:
    """``Succeeded`` / ``Failed`` once the job has ended (its last true terminal condition), else None."""
    for cond in reversed(obj.get("status", {}).get("conditions") or []):
        if cond.get("type") in ("Succeeded", "Failed") and cond.get("status") == "True":
            return cond["type"]
    return None


def wait_for_pytorchjob(api: Any, namespace: str, name: str, *, timeout_s: float = 0.0, poll_s: float = 15.0,
                        on_poll: Any = None) -> str:
    """Poll a PyTorchJob (``api``: ``kubernetes.client.CustomObjectsApi``) until it ends; returns its state, raises
    ``TimeoutError`` after ``timeout_s`` (0 = no limit). ``on_poll()`` runs between polls (e.g. reading Pipes
    messages)."""
    import time

    start = time.monotonic()
    while True:
        obj = api.get_namespaced_custom_object(*PYTORCHJOB_API[:2], namespace, PYTORCHJOB_API[2], name)
        state = pytorchjob_state(obj)
        if state:
            return state
        if timeout_s and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"PyTorchJob {namespace}/{name} still running after {timeout_s:.0f} s")
        if on_poll is not None:
            on_poll()
        time.sleep(poll_s)


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


EXAMPLE_NODES = 4  # the checked-in multi-node template: 4 nodes x 8 GPUs


def example_pytorchjob_manifest() -> dict[str, Any]:
    """The PyTorchJob of one 4 x 8-GPU stage (infra/k8s/training-pytorchjob.yaml), minus the Pipes env vars added at
    launch."""
    # HSDP: shard within a node, replicate across nodes.
    job = dataclasses.replace(EXAMPLE_JOB, parallel=dataclasses.replace(
        EXAMPLE_JOB.parallel, nproc=EXAMPLE_NODES * EXAMPLE["gpus"], replicate=EXAMPLE_NODES))
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.k5.svc.cluster.local:5000", "K5_HOME": EXAMPLE["k5_home"]}
    settings = {k: EXAMPLE[k] for k in ("image", "k5_home", "k5_home_pvc", "secret_env", "service_account",
                                        "node_selector")}
    return build_pytorchjob(name="k5-train-video-lite-mr-5s", namespace="k5", job=job, nodes=EXAMPLE_NODES,
                            pod_settings=settings, env=env)


TEMPLATE_HEADER = ("# Generated by `python -m orchestration.training_jobs {kind}` (orchestration/training_jobs.py).\n"
                   "# {how}; see infra/k8s/README.md.")


def render_template(kind: str) -> str:
    """``pod`` (infra/k8s/training-pod.yaml) or ``pytorchjob`` (infra/k8s/training-pytorchjob.yaml)."""
    import yaml

    if kind == "pod":
        how, manifest = "Dagster's PipesK8sClient submits this spec with its Pipes env vars added", \
            example_pod_manifest()
    elif kind == "pytorchjob":
        how, manifest = ("TrainingJobResource(nodes>1) creates this PyTorchJob with its Pipes env vars added",
                         example_pytorchjob_manifest())
    else:
        raise ValueError(f"template kind {kind!r} is not pod or pytorchjob")
    return TEMPLATE_HEADER.format(kind=kind, how=how) + "\n" + yaml.safe_dump(manifest, sort_keys=False)


if __name__ == "__main__":  # python -m orchestration.training_jobs [pod|pytorchjob] > infra/k8s/training-<kind>.yaml
    print(render_template(sys.argv[1] if len(sys.argv) > 1 else "pod"), end="")

"""Production Pipes path of a training stage (issue 5): the Kubernetes pod spec, validated against the kubernetes client
models exactly as ``PipesK8sClient`` builds the pod (no cluster), and the Dagster code location with it selected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kubernetes
import pytest
import yaml
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from dagster_k8s.pipes import build_pod_body

from k5model.training.job import TrainJob
from orchestration.resources import TrainingJobResource
from orchestration.training_jobs import (
    build_training_pod_spec,
    example_pod_manifest,
    training_command,
)

REPO = Path(__file__).resolve().parents[1]
JOB = TrainJob.from_flat(stage="video_lite_lr", out="/k5/models/training/.video_lite_lr.partial", steps=10, nproc=8)


def _resource(**overrides) -> TrainingJobResource:
    fields = {"backend": "k8s", "image": "registry.example.com/k5:1", "k5_home_pvc": "k5-home", "k5_home_mount": "/k5",
              "gpus_per_pod": 8, "secret_env": "k5-object-store", "memory": "900Gi"}
    return TrainingJobResource(**{**fields, **overrides})


def test_pod_spec_validates_as_pipes_k8s_client_builds_it() -> None:
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "K5_MLFLOW_RUN_ID": "abc123"}
    spec = _resource().pod_spec(JOB, env)
    # strict model validation: an unknown or misspelt key anywhere raises
    k8s_model_from_dict(kubernetes.client.V1PodSpec, k8s_snake_case_dict(kubernetes.client.V1PodSpec, spec))
    # the pod PipesK8sClient.run submits for this base spec (it adds the Pipes bootstrap env vars to container 0)
    pod = build_pod_body("k5-train-test", None, None, {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "m"},
                         {"labels": {"app.kubernetes.io/name": "k5-train"}}, spec)
    assert isinstance(pod, kubernetes.client.V1Pod) and pod.spec.restart_policy == "Never"
    (c,) = pod.spec.containers
    assert c.image == "registry.example.com/k5:1"
    assert c.command[:7] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8", "-m"]
    assert c.command[7:9] == ["orchestration.pipes_train", "--job"]
    assert TrainJob.from_json(c.command[9]) == JOB  # the typed job travels whole, as JSON
    assert c.resources.limits == {"nvidia.com/gpu": "8", "memory": "900Gi"} == c.resources.requests
    env_vars = {e.name: e.value for e in c.env}
    assert env_vars["K5_MLFLOW_RUN_ID"] == "abc123" and env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env_vars["K5_HOME"] == "/k5" and "DAGSTER_PIPES_CONTEXT" in env_vars
    assert c.env_from[0].secret_ref.name == "k5-object-store"
    mounts = {m.name: m.mount_path for m in c.volume_mounts}
    assert mounts == {"k5-home": "/k5", "dshm": "/dev/shm"}
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes["k5-home"].persistent_volume_claim.claim_name == "k5-home"
    assert volumes["dshm"].empty_dir.medium == "Memory"
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
    # and it serialises back to the same camelCase structure (nothing was dropped on the way)
    assert kubernetes.client.ApiClient().sanitize_for_serialization(pod)["spec"]["volumes"] == spec["volumes"]


def test_pod_settings_errors_name_the_bad_input() -> None:
    with pytest.raises(ValueError, match="K5_TRAIN_IMAGE"):
        _resource(image=None).pod_spec(JOB, {})
    with pytest.raises(ValueError, match="K5_HOME_PVC"):
        _resource(k5_home_pvc=None).pod_spec(JOB, {})
    with pytest.raises(ValueError, match="must be an absolute path"):
        build_training_pod_spec(image="i", command=["x"], env={}, gpus=1, k5_home="k5", k5_home_pvc="p")
    with pytest.raises(ValueError, match="K5_PIPES='slurm'"):
        TrainingJobResource.from_env({"K5_PIPES": "slurm"})
    with pytest.raises(ValueError, match="K5_GPUS_PER_POD='eight'"):
        TrainingJobResource.from_env({"K5_PIPES": "k8s", "K5_GPUS_PER_POD": "eight"})
    with pytest.raises(ValueError, match="nproc, replicate and sequence_parallel must be >= 1"):
        JOB.replace(nproc=0)


def test_local_command_and_env_selection() -> None:
    local = TrainingJobResource.from_env({})
    assert local.backend == "subprocess"
    one = JOB.replace(nproc=1)
    assert training_command(one) == [sys.executable, "-m", "orchestration.pipes_train", "--job", one.to_json()]
    assert local.default_nproc() == 1
    k8s = TrainingJobResource.from_env({"K5_PIPES": "k8s", "K5_TRAIN_IMAGE": "img:2", "K5_GPUS_PER_POD": "4",
                                        "K5_HOME_PVC": "claim", "K5_K8S_NAMESPACE": "train"})
    assert (k8s.backend, k8s.image, k8s.gpus_per_pod, k8s.k5_home_pvc, k8s.namespace) == ("k8s", "img:2", 4, "claim",
                                                                                           "train")
    assert k8s.default_nproc() == 4  # what a stage asset puts in its job when its config names no process count


def test_definitions_load_with_k8s_client_selected(tmp_path: Path) -> None:
    code = (
        "import dagster as dg\n"
        "from orchestration.definitions import defs\n"
        "dg.Definitions.validate_loadable(defs)\n"
        "job = defs.resolve_job_def('main_job')\n"
        "r = defs.resources['training_job']\n"
        "assert r.backend == 'k8s' and r.image == 'registry.example.com/k5:1' and r.gpus_per_pod == 2, r\n"
        "from k5model.training.job import TrainJob\n"
        "spec = r.pod_spec(TrainJob.from_flat(stage='video_lite_lr', out='/k5/x', nproc=r.default_nproc()), {})\n"
        "assert spec['containers'][0]['resources']['limits'] == {'nvidia.com/gpu': '2'}\n"
        "print('ok', len(job.asset_layer.executable_asset_keys))\n"
    )
    env = {**os.environ, "K5_HOME": str(tmp_path / "k5"), "K5_PIPES": "k8s",
           "K5_TRAIN_IMAGE": "registry.example.com/k5:1", "K5_GPUS_PER_POD": "2", "K5_HOME_PVC": "k5-home"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_infra_template_is_the_rendered_example() -> None:
    template = yaml.safe_load((REPO / "infra/k8s/training-pod.yaml").read_text())
    assert template == example_pod_manifest(), "regenerate: python -m orchestration.training_jobs > " \
                                               "infra/k8s/training-pod.yaml"
    spec = template["spec"]
    k8s_model_from_dict(kubernetes.client.V1PodSpec, k8s_snake_case_dict(kubernetes.client.V1PodSpec, spec))
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"

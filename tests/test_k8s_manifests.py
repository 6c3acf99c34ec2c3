"""Multi-node training manifests (issue 21): the PyTorchJob that ``TrainingJobResource(nodes>1)`` renders, and every
Kubernetes manifest checked into infra/, validate offline against the Kubernetes JSON schemas (kubernetes-validate)
and the training-operator's CRD schema vendored in infra/k8s/crds/. Each check is shown rejecting a bad manifest."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import jsonschema
import kubernetes_validate
import psutil
import pytest
import yaml

from k5model.training.job import TrainJob
from orchestration.local_postgres import _free_port as free_port
from orchestration.resources import TrainingJobResource
from orchestration.training_jobs import NCCL_ENV, pytorchjob_name, render_template, training_command

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"  # schemas shipped with kubernetes-validate; no network
CRD_SCHEMA = yaml.safe_load((REPO / "infra/k8s/crds/kubeflow.org_pytorchjobs.v1.schema.yaml").read_text())
OUT = "/k5/models/training/.video_lite_mr_5s.partial"
JOB = TrainJob.from_flat(stage="video_lite_mr_5s", out=OUT, resume=True, nproc=16, replicate=2, bf16=True,
                         shards="latents", store="s3://k5-objects", text_encoders="/k5/models/base", ckpt_every=500)


def _resource(**overrides: Any) -> TrainingJobResource:
    fields = {"backend": "k8s", "image": "registry.example.com/k5:1", "k5_home_pvc": "k5-home", "k5_home_mount": "/k5",
              "gpus_per_pod": 8, "nodes": 2, "secret_env": "k5-object-store", "namespace": "k5"}
    return TrainingJobResource(**{**fields, **overrides})


def validate_k8s(manifest: dict) -> None:
    """Built-in kinds against the Kubernetes schema; PyTorchJob against the CRD schema plus each pod template
    against the Kubernetes PodTemplate schema."""
    if manifest.get("kind") != "PyTorchJob":
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        return
    jsonschema.validate(manifest, CRD_SCHEMA)
    for name, replica in manifest["spec"]["pytorchReplicaSpecs"].items():
        assert name in ("Master", "Worker"), f"replica type {name} is not one the training-operator knows"
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"check-{name.lower()}"},
                    "template": replica["template"]}
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)


def infra_manifests() -> list[tuple[str, dict]]:
    """Every Kubernetes object in infra/k8s (YAML documents with apiVersion and kind)."""
    found = []
    for path in sorted((REPO / "infra/k8s").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                found.append((f"{path.name}#{i}", doc))
    return found


def test_resource_renders_a_valid_multinode_pytorchjob() -> None:
    resource = _resource()
    name = pytorchjob_name(JOB.stage.stage, "0a1b2c3d-run", 1)
    manifest = resource.pytorchjob(JOB, {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "K5_MLFLOW_RUN_ID": "r1"}, name)
    validate_k8s(manifest)
    assert manifest["metadata"]["name"] == name == "k5-video-lite-mr-5s-0a1b2c3d-1"
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    assert manifest["spec"]["nprocPerNode"] == "8" and manifest["spec"]["runPolicy"]["backoffLimit"] == 3
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the operator injects MASTER_ADDR/PORT, WORLD_SIZE, RANK here
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert {k: env[k] for k in NCCL_ENV} == NCCL_ENV and env["K5_HOME"] == "/k5"
        cmd = shlex.join(container["command"])
        assert ("-m torch.distributed.run --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "
                "'$(MASTER_ADDR):$(MASTER_PORT)' --rdzv-id " + name) in cmd
        # The typed job travels as JSON; its run folder is on the shared claim, so a restarted pod resumes from the
        # newest checkpoint there.
        job = TrainJob.from_json(container["command"][container["command"].index("--job") + 1])
        assert job == JOB and job.checkpoint.resume and job.checkpoint.out.startswith("/k5/")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims[mounts["/k5"]] == "k5-home"
        assert container["envFrom"] == [{"secretRef": {"name": "k5-object-store"}}]


def test_more_nodes_and_nccl_overrides() -> None:
    job = TrainJob.from_json(json.dumps({**json.loads(JOB.to_json()),
                                         "parallel": {**json.loads(JOB.to_json())["parallel"], "nproc": 32}}))
    manifest = _resource(nodes=4, nccl_env={"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "ib0"}).pytorchjob(
        job, {}, "k5-x-1")
    validate_k8s(manifest)
    assert manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    env = {e["name"]: e["value"] for e in
           manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NCCL_IB_HCA"] == "mlx5" and env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert _resource(nodes=4).default_nproc() == 32 and _resource(nodes=1).default_nproc() == 8


@pytest.mark.parametrize("change, message", [
    ({"nodes": 1}, "2\\+ nodes"),
    ({"nodes": 3}, "do not split over nodes=3"),
    ({"k5_home_mount": "/elsewhere"}, "not on the shared volume"),
    ({"image": None}, "image is empty"),
])
def test_bad_multinode_settings_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _resource(**change).pytorchjob(JOB, {}, "k5-x-1")


def test_a_job_that_would_restart_from_scratch_is_refused() -> None:
    job = TrainJob.from_flat(stage="video_lite_mr_5s", out=OUT, resume=False, nproc=16)
    with pytest.raises(ValueError, match="resume is False"):
        _resource().pytorchjob(job, {}, "k5-x-1")


def test_single_node_command_is_unchanged() -> None:
    assert "--standalone" in training_command(JOB, python="python")
    assert "--nnodes" not in training_command(JOB, python="python")


def test_schemas_reject_bad_manifests() -> None:
    good = _resource().pytorchjob(JOB, {}, "k5-x-1")
    typo = copy.deepcopy(good)
    typo["spec"]["runPolicy"]["backofLimit"] = 3  # misspelt: the API server would drop it silently
    with pytest.raises(jsonschema.ValidationError, match="backofLimit"):
        validate_k8s(typo)
    policy = copy.deepcopy(good)
    policy["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError, match="Sometimes"):
        validate_k8s(policy)
    pod = copy.deepcopy(good)
    pod["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"] = "8"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(pod)


def test_every_infra_manifest_validates_and_templates_are_current() -> None:
    manifests = infra_manifests()
    kinds = {doc["kind"] for _, doc in manifests}
    assert {"Pod", "PyTorchJob"} <= kinds, kinds
    for where, doc in manifests:
        try:
            validate_k8s(doc)
        except Exception as err:  # name the file in the failure
            raise AssertionError(f"{where}: {err}") from err
    for kind in ("pod", "pytorchjob"):
        path = REPO / f"infra/k8s/training-{kind}.yaml"
        assert yaml.safe_load(path.read_text()) == yaml.safe_load(render_template(kind)), \
            f"regenerate: python -m orchestration.training_jobs {kind} > {path.relative_to(REPO)}"


def test_helm_values_agree_with_the_instance_yaml() -> None:
    """infra/helm/dagster-values.yaml renders (through Dagster's chart) the instance infra/dagster.yaml describes."""
    helm = yaml.safe_load((REPO / "infra/helm/dagster-values.yaml").read_text())
    instance = yaml.safe_load((REPO / "infra/dagster.yaml").read_text())
    assert helm["postgresql"]["postgresqlScheme"] == instance["storage"]["postgres"]["postgres_db"]["scheme"]
    assert helm["postgresql"]["enabled"] is False and helm["generatePostgresqlPasswordSecret"] is False
    queued = helm["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    runs = instance["concurrency"]["runs"]
    assert queued["maxConcurrentRuns"] == runs["max_concurrent_runs"]
    assert [(t["key"], t["value"], t["limit"]) for t in queued["tagConcurrencyLimits"]] == \
        [(t["key"], t["value"], t["limit"]) for t in runs["tag_concurrency_limits"]]
    pools = instance["concurrency"]["pools"]
    assert helm["concurrency"]["pools"] == {"granularity": pools["granularity"], "defaultLimit": pools["default_limit"]}
    monitoring = helm["dagsterDaemon"]["runMonitoring"]
    for camel, snake in (("enabled", "enabled"), ("startTimeoutSeconds", "start_timeout_seconds"),
                         ("maxResumeRunAttempts", "max_resume_run_attempts"),
                         ("pollIntervalSeconds", "poll_interval_seconds")):
        assert monitoring[camel] == instance["run_monitoring"][snake], camel
    launcher = helm["runLauncher"]
    assert launcher["type"] == instance["run_launcher"]["class"] == "K8sRunLauncher"
    assert launcher["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]["resources"] == \
        instance["run_launcher"]["config"]["run_k8s_config"]["container_config"]["resources"]
    code = helm["dagster-user-deployments"]["deployments"][0]
    assert code["dagsterApiGrpcArgs"] == ["--module-name", "orchestration.definitions"]
    # Every pod Dagster starts mounts the shared K5 home and gets the one settings ConfigMap + object-store Secret.
    for where in (code, launcher["config"]["k8sRunLauncher"]):
        assert {"name": "k5-settings"} in where["envConfigMaps"] and {"name": "k5-object-store"} in where["envSecrets"]
        assert where["volumeMounts"] == [{"name": "k5-home", "mountPath": "/k5"}]


def _kill_pod(proc: subprocess.Popen) -> None:
    """SIGKILL a pod's processes: torchrun and its workers (which torchrun starts in sessions of their own)."""
    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for victim in [psutil.Process(proc.pid), *victims]:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


class LocalPyTorchJob:
    """Runs a rendered PyTorchJob's containers as local processes the way the training-operator starts its pods (its
    env: MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK; Kubernetes' ``$(VAR)`` expansion in the command; OnFailure: every
    pod restarted after a failure, at most ``runPolicy.backoffLimit`` times). ``kill_worker_when``: SIGKILL the Worker
    pod's processes once that path exists (a node lost mid-stage)."""

    def __init__(self, kill_worker_when: Path, logs: Path) -> None:
        self.kill_worker_when, self.logs = kill_worker_when, logs
        logs.mkdir(parents=True, exist_ok=True)
        self.manifest: dict = {}
        self.attempts = 0

    def submit(self, manifest: dict) -> None:
        validate_k8s(manifest)
        self.manifest = manifest

    def _start(self) -> list:
        replicas = self.manifest["spec"]["pytorchReplicaSpecs"]
        pods = [("Master", replicas["Master"])] + [("Worker", replicas["Worker"])] * replicas["Worker"]["replicas"]
        port, procs = str(free_port()), []
        for rank, (_, replica) in enumerate(pods):
            container = replica["template"]["spec"]["containers"][0]
            env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}, "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port, "WORLD_SIZE": str(len(pods)), "RANK": str(rank), "OMP_NUM_THREADS": "1"}
            command = [re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], arg) for arg in container["command"]]
            command[0] = sys.executable if command[0] == "python" else command[0]
            log = self.logs / f"attempt{self.attempts}-rank{rank}.log"
            with open(log, "w") as handle:  # the pod's log
                procs.append(subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=handle,
                                              stderr=subprocess.STDOUT))
        return procs

    def wait(self, name: str) -> str:
        for _ in range(self.manifest["spec"]["runPolicy"]["backoffLimit"] + 1):
            self.attempts += 1
            procs = self._start()
            deadline = time.monotonic() + 600
            try:
                while time.monotonic() < deadline:
                    codes = [p.poll() for p in procs]
                    if all(c == 0 for c in codes):
                        return "Succeeded"
                    if any(c not in (None, 0) for c in codes):
                        break  # a pod failed: the others cannot finish without it; restart all (OnFailure)
                    if self.attempts == 1 and self.kill_worker_when.exists() and procs[1].poll() is None:
                        _kill_pod(procs[1])  # the node is lost: every process of the Worker pod dies
                    time.sleep(0.2)
            finally:
                for proc in procs:
                    _kill_pod(proc)
                    proc.wait(timeout=30)
        return "Failed"


@pytest.mark.slow
def test_rendered_pytorchjob_trains_on_two_nodes_and_a_restart_resumes(tmp_path: Path) -> None:
    """The rendered containers (torchrun c10d over 2 'nodes' on 127.0.0.1, the TrainJob JSON, Pipes through a file on
    the shared home) train a tiny stage through a Dagster asset; the Worker is killed after the first checkpoint and
    the restarted pods resume from it."""
    home = tmp_path / "k5"
    out = home / "models/training/.tiny_demo.partial"
    job = TrainJob.from_flat(stage="tiny_demo", out=str(out), steps=6, ckpt_every=2, resume=True, nproc=2,
                             export=False)
    trainer = _resource(k5_home_mount=str(home), gpus_per_pod=1, nodes=2)
    launcher = LocalPyTorchJob(kill_worker_when=out / "checkpoints" / "step_2", logs=tmp_path / "pod_logs")

    @dg.asset
    def two_node_stage(context):  # noqa: ANN001 (a string annotation here would not satisfy Dagster)
        return trainer.run_pytorchjob(context, job, {"K5_TRAIN_STEP_SLEEP_S": "1.0"}, submit=launcher.submit,
                                      wait=launcher.wait).get_materialize_result()

    result = dg.materialize([two_node_stage], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    logs = {p.name: p.read_text()[-1500:] for p in sorted((tmp_path / "pod_logs").glob("*.log"))}
    assert result.success, logs
    assert launcher.attempts == 2, "the Worker kill should have failed the first attempt"
    meta = {k: v.value for k, v in result.asset_materializations_for_node("two_node_stage")[0].metadata.items()}
    assert meta["world_size"] == 2 and meta["step"] == 6
    assert 2 <= meta["resumed_from"] < 6, meta  # the restart resumed from a checkpoint of the killed attempt

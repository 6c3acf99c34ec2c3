"""No literal credential in anything deployed (issue 21): every manifest and config under infra/ (and the manifests
the code renders) is parsed and scanned; credentials may only be environment or Secret references. A planted literal
of each kind is caught, so the scan decides both ways."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"

# Keys whose value IS a credential (normalised: lower case, non-alphanumerics as "_"). A key ending in "secret" or
# "secret_name" names a Secret object and is fine.
CREDENTIAL_KEY = re.compile(r"(password|passwd|secret_access_key|secret_key|access_key_id|access_key|api_key|token|"
                            r"private_key|credentials?)$")
ENV_REF = re.compile(r"^(\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}|\$\$\{[A-Za-z_][A-Za-z0-9_]*\}|"
                     r"\$\([A-Za-z_][A-Za-z0-9_]*\))$")
COMPOSE_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-([^}]*)\}")
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://([^:/@\s\"']+):([^@\s\"']+)@")
RAW_PATTERNS = {"AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
                "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")}


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()).strip("_")


def _is_reference(value: Any) -> bool:
    if isinstance(value, dict):  # dagster.yaml {env: VAR}; k8s valueFrom.secretKeyRef; helm secret refs
        return set(value) <= {"env"} or "secretKeyRef" in value or "secretRef" in value
    return value is None or value == "" or (isinstance(value, str) and bool(ENV_REF.match(value.strip())))


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every mapping entry; k8s env lists ({name, value}) count as key = name."""
    if isinstance(node, dict):
        if set(node) >= {"name"} and set(node) <= {"name", "value", "valueFrom"} and ("value" in node
                                                                                    or "valueFrom" in node):
            yield f"{path}.{node['name']}", str(node["name"]), node.get("value", node.get("valueFrom"))
        for key, value in node.items():
            yield f"{path}.{key}", str(key), value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{path}[{i}]")


def scan_document(doc: Any, where: str) -> list[str]:
    """Findings in one parsed document: credential keys with a literal value, URL user:password literals, compose
    ``${VAR:-default}`` defaults for credential variables, and raw key material."""
    findings = []
    for path, key, value in _walk(doc):
        if CREDENTIAL_KEY.search(_norm(key)) and not _norm(key).endswith("secret") and not _is_reference(value):
            if isinstance(value, (str, int, float)) and not COMPOSE_DEFAULT.fullmatch(str(value)):
                findings.append(f"{where}{path}: literal credential for {key!r}")
    for path, _, value in _walk(doc):
        if isinstance(value, str):
            findings += scan_text(value, f"{where}{path}")
    return sorted(set(findings))


def scan_text(text: str, where: str) -> list[str]:
    findings = []
    for match in URL_CREDENTIALS.finditer(text):
        if not ENV_REF.match(match.group(2)) or not ENV_REF.match(match.group(1)):
            findings.append(f"{where}: credentials in URL {match.group(0)!r}")
    for var, default in COMPOSE_DEFAULT.findall(text):
        if default and CREDENTIAL_KEY.search(_norm(var)):
            findings.append(f"{where}: default value for credential variable {var}")
    for name, pattern in RAW_PATTERNS.items():
        if pattern.search(text):
            findings.append(f"{where}: {name}")
    return findings


def rendered_documents() -> list[tuple[str, Any]]:
    """Every YAML document under infra/ plus what the code renders for a deployment."""
    from k5model.training.job import TrainJob
    from orchestration.production import production_executor, production_resources, step_pod_config
    from orchestration.resources import TrainingJobResource
    from orchestration.training_jobs import render_template

    docs: list[tuple[str, Any]] = []
    for path in sorted(INFRA.rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
                docs.append((f"{path.relative_to(REPO)}#{i}", doc))
        elif path.is_file():
            docs.append((str(path.relative_to(REPO)), path.read_text(errors="replace")))
    for kind in ("pod", "pytorchjob"):
        docs.append((f"render_template({kind})", yaml.safe_load(render_template(kind))))
    env = {"K5_DEPLOYMENT": "production", "K5_OBJECT_STORE": "s3://k5-objects", "AWS_ACCESS_KEY_ID": "from-secret",
           "AWS_SECRET_ACCESS_KEY": "from-secret", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "K5_PIPES": "k8s",
           "K5_TRAIN_NODES": "2", "K5_EXECUTOR": "k8s", "K5_HOME_PVC": "k5-home"}
    resources = production_resources(env)
    docs.append(("production_resources", {k: r.model_dump() for k, r in resources.items()}))
    assert production_executor(env) is not None
    docs.append(("step_pod_config", step_pod_config(env)))
    job = TrainJob.from_flat(stage="video_lite_lr", out="/k5/models/training/x", resume=True, nproc=16)
    trainer = TrainingJobResource(backend="k8s", image="i:1", k5_home_pvc="k5-home", k5_home_mount="/k5", nodes=2,
                                  secret_env="k5-object-store")
    docs.append(("TrainingJobResource.pytorchjob", trainer.pytorchjob(job, {}, "k5-x-1")))
    return docs


def _scan(where: str, doc: Any) -> list[str]:
    return scan_text(doc, where) if isinstance(doc, str) else scan_document(doc, where)


def test_no_literal_secrets_in_infra_or_rendered_manifests() -> None:
    docs = rendered_documents()
    names = {w.split("#")[0] for w, _ in docs}
    assert {"infra/dagster.yaml", "infra/docker-compose.yml", "infra/helm/dagster-values.yaml",
            "infra/k8s/mlflow.yaml", "infra/k8s/settings.yaml", "infra/mlflow/Dockerfile"} <= names
    findings = [f for where, doc in docs for f in _scan(where, doc)]
    assert findings == []


@pytest.mark.parametrize("plant, expected", [
    (lambda d: d["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="hunter2"), "POSTGRES_PASSWORD"),
    (lambda d: d["services"]["minio"]["environment"].update(MINIO_ROOT_PASSWORD="${K5_S3_SECRET_KEY:-minio123}"),
     "default value for credential variable K5_S3_SECRET_KEY"),
    (lambda d: d["services"]["mlflow"].update(command="mlflow server --backend-store-uri "
                                                      "postgresql://k5:k5dev@postgres:5432/mlflow"),
     "credentials in URL"),
    (lambda d: d["x-object-store"].update(AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE"), "AWS access key id"),
])
def test_planted_literals_in_compose_are_caught(plant: Any, expected: str) -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    assert scan_document(compose, "compose") == []
    planted = copy.deepcopy(compose)
    plant(planted)
    findings = scan_document(planted, "compose")
    assert findings and any(expected in f for f in findings), findings


def test_planted_literals_in_k8s_and_dagster_config_are_caught() -> None:
    mlflow = list(yaml.safe_load_all((INFRA / "k8s/mlflow.yaml").read_text()))[0]
    env = mlflow["spec"]["template"]["spec"]["containers"][0]["env"]
    assert scan_document(mlflow, "mlflow") == []
    env[1] = {"name": "MLFLOW_DB_PASSWORD", "value": "s3cr3t"}
    assert any("MLFLOW_DB_PASSWORD" in f for f in scan_document(mlflow, "mlflow"))

    instance = yaml.safe_load((INFRA / "dagster.yaml").read_text())
    assert scan_document(instance, "dagster.yaml") == []
    instance["storage"]["postgres"]["postgres_db"]["password"] = "s3cr3t"
    assert any("password" in f for f in scan_document(instance, "dagster.yaml"))

    helm = yaml.safe_load((INFRA / "helm/dagster-values.yaml").read_text())
    helm["postgresql"]["postgresqlPassword"] = "s3cr3t"
    assert any("postgresqlPassword" in f for f in scan_document(helm, "helm"))
    # Secret names and references are not credentials.
    assert scan_document({"postgres_password_secret": "dagster-postgresql-secret",
                          "global": {"postgresqlSecretName": "x"}, "password": {"env": "PG"}}, "refs") == []
    assert scan_text("-----BEGIN RSA PRIVATE KEY-----\nabc", "Dockerfile") == ["Dockerfile: private key"]

"""Releases in the MLflow model registry (no Dagster here; ``assets/release.py`` wires it).

A release is a version of registered model ``k5-<family>`` whose ``source`` is the immutable object-store URI of a
published pipeline folder (``k5data.publish``): ``file://`` or ``s3://``; nothing goes through the tracking server.
The SQLite registry stores the source as given and ``models:/NAME@alias`` resolves to it
(``get_model_version_download_uri``), so any MLflow client downloads it with the artifact repository of its scheme
(S3: ``MLFLOW_S3_ENDPOINT_URL`` for a non-AWS endpoint). Lineage goes into version tags (MLflow OSS cannot log model
inputs); the model card is the version's description and an artifact of a "release" run. Every new version gets alias
``candidate``; ``champion`` moves only through the gate (``apply_gate``).

Note: ``mlflow.artifacts.download_artifacts("models:/...", registry_uri=...)`` (MLflow 3.17) resolves the alias with
the process-global registry URI, not the one passed in; ``download_release`` therefore resolves the version with its
own client and downloads the version's source.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.model_card import ReleaseLineage, with_gate
from evaluation.release_gate import OVERALL_GROUPS, GateDecision, decide, lineage_name
from k5data.publish import PublishedFolder, verify_folder

CANDIDATE, CHAMPION = "candidate", "champion"
TAG = "k5."  # prefix of our version tags
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def model_name(family: str) -> str:
    return f"k5-{family}"


@dataclass(frozen=True)
class ReleaseVersion:
    name: str
    version: str  # as a string, whatever type the store returned
    source: str
    run_id: str  # the release run holding the model card
    manifest_sha256: str
    reused: bool  # the same content was already registered: its version got the alias again

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def lineage_tags(lineage: ReleaseLineage, published: PublishedFolder) -> dict[str, str]:
    """Version (and release run) tags: where the weights come from and what they are."""
    tags = {"lineage_name": lineage.lineage_name, "family": lineage.family, "stage": lineage.stage,
            "parent_stage": lineage.parent_stage or "", "chain": ",".join(lineage.stages),
            "training_run_ids": ",".join(f"{s}={r}" for s, r in lineage.training_run_ids.items()),
            "dataset_snapshot": lineage.dataset_snapshot or "", "shard_index_uri": lineage.shard_index_uri or "",
            "sbs_comparison": lineage.comparison or "", "dagster_run_id": lineage.dagster_run_id or "",
            "manifest_sha256": published.manifest.sha256, "source_uri": published.uri,
            "total_bytes": str(published.manifest.total_bytes)}
    return {TAG + k: v for k, v in tags.items() if v}


def _find_version(client: Any, name: str, published: PublishedFolder) -> Any | None:
    """The first version registered with the same content at the same source (another store: a new version)."""
    found = client.search_model_versions(
        f"name = '{name}' and tags.`{TAG}manifest_sha256` = '{published.manifest.sha256}'")
    same = [v for v in found if v.source == published.uri]
    return min(same, key=lambda v: int(v.version)) if same else None


def register_release(tracking_uri: str, experiment_id: str, *, lineage: ReleaseLineage, published: PublishedFolder,
                     card: str, run_tags: dict[str, str] | None = None) -> ReleaseVersion:
    """Register ``published`` as a new version of ``k5-<family>`` (source = its store URI) with lineage tags and the
    model card, and point ``candidate`` at it. ``run_tags``: extra tags of the release run (e.g. the Dagster run and
    asset). Idempotent: content already registered (same manifest sha256) gets ``candidate`` again instead of a
    duplicate version (content at another source: a new version)."""
    from mlflow.exceptions import MlflowException

    client, name = _client(tracking_uri), model_name(lineage.family)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"Kandinsky 5 {lineage.family} releases (k5 lifecycle)")
    existing = _find_version(client, name, published)
    if existing is not None:
        client.set_registered_model_alias(name, CANDIDATE, existing.version)
        return ReleaseVersion(name, str(existing.version), existing.source, existing.run_id or "",
                              published.manifest.sha256, reused=True)
    tags = lineage_tags(lineage, published)
    run = client.create_run(experiment_id, run_name=f"release/{name}/{lineage.stage}",
                            tags={**tags, **(run_tags or {})})
    run_id = run.info.run_id
    client.log_text(run_id, card, "model_card.md")
    client.log_text(run_id, published.manifest.to_json(), "manifest.json")
    client.set_terminated(run_id)
    version = client.create_model_version(name, published.uri, run_id=run_id, tags=tags, description=card)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return ReleaseVersion(name, str(version.version), version.source, run_id, published.manifest.sha256, reused=False)


def alias_version(tracking_uri: str, name: str, alias: str) -> Any | None:
    """The ``ModelVersion`` behind ``name@alias``, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(tracking_uri: str, name: str, version: str, alias: str = CHAMPION) -> None:
    """Move ``alias`` (default ``champion``) to ``version``."""
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def apply_gate(tracking_uri: str, name: str, version: str, summary: dict, *, margin: float = 0.0,
               groups: Sequence[str] = OVERALL_GROUPS, allow_simulated: bool = True) -> GateDecision:
    """Run the release gate for ``version`` against the current champion, move ``champion`` when it passes, and
    record the decision on the version (``k5.gate.*`` tags, the card's gate section, the release run's card)."""
    client = _client(tracking_uri)
    candidate = client.get_model_version(name, str(version))
    cand_name = candidate.tags.get(f"{TAG}lineage_name") or "unknown"
    champion = alias_version(tracking_uri, name, CHAMPION)
    if champion is not None and champion.version == candidate.version:
        decision = GateDecision(True, f"version {version} is already the champion", candidate=lineage_name(cand_name),
                                baseline=None, champion=lineage_name(cand_name), margin=margin,
                                comparison=summary.get("comparison"), simulated=bool(summary.get("simulated")))
    else:
        champ_name = None if champion is None else (champion.tags.get(f"{TAG}lineage_name")
                                                     or f"unknown:version {champion.version}")  # registered by hand
        decision = decide(summary, candidate=cand_name, champion=champ_name, margin=margin, groups=groups,
                          allow_simulated=allow_simulated)
        if decision.promote:
            promote(tracking_uri, name, candidate.version)
    for key, value in {"decision": decision.decision, "reason": decision.reason[:4000], "margin": str(margin),
                       "comparison": str(decision.comparison or "")}.items():
        client.set_model_version_tag(name, candidate.version, f"{TAG}gate.{key}", value)
    card = with_gate(candidate.description or "", decision)
    client.update_model_version(name, candidate.version, description=card)
    if candidate.run_id:
        client.log_text(candidate.run_id, card, "model_card.md")
    return decision


def release_status(tracking_uri: str, family: str) -> list[str]:
    """What a demo prints about a family's release: the candidate version and its source, the gate's decision on it
    and why, and the champion."""
    name = model_name(family)
    candidate, champion = alias_version(tracking_uri, name, CANDIDATE), alias_version(tracking_uri, name, CHAMPION)
    if candidate is None:
        return [f"{name}: no release registered"]
    gate = candidate.tags.get(f"{TAG}gate.decision", "not run")
    return [f"{name} version {candidate.version} (@{CANDIDATE}): {candidate.source}",
            f"gate: {gate}" + (f" ({candidate.tags[TAG + 'gate.reason']})" if gate != "not run" else ""),
            f"@{CHAMPION}: " + ("none" if champion is None else f"version {champion.version} ({champion.source})")]


@contextmanager
def _s3_endpoint(endpoint_url: str | None) -> Iterator[None]:
    """MLflow's S3 repository reads ``MLFLOW_S3_ENDPOINT_URL``; our stores read ``K5_S3_ENDPOINT_URL``."""
    endpoint = endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("K5_S3_ENDPOINT_URL")
    before = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if endpoint:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)
        else:
            os.environ["MLFLOW_S3_ENDPOINT_URL"] = before


def resolve(tracking_uri: str, uri: str) -> Any:
    """The ``ModelVersion`` of ``models:/NAME@alias`` or ``models:/NAME/VERSION``."""
    match = _MODELS_URI.match(uri)
    if not match:
        raise ValueError(f"{uri!r} is not a model version URI; use models:/NAME@alias or models:/NAME/VERSION")
    client = _client(tracking_uri)
    if match["alias"]:
        return client.get_model_version_by_alias(match["name"], match["alias"])
    return client.get_model_version(match["name"], match["version"])


def download_release(uri: str, dst: Path, tracking_uri: str, endpoint_url: str | None = None) -> Path:
    """Download the release ``uri`` (``models:/k5-video_lite@candidate``) into the new or empty folder ``dst`` and
    verify it against its manifest; returns ``dst``. Raises ``k5data.publish.ManifestMismatch`` naming a bad file."""
    import mlflow

    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; download a release into a new folder")
    version = resolve(tracking_uri, uri)
    source = _client(tracking_uri).get_model_version_download_uri(version.name, version.version)
    dst.mkdir(parents=True, exist_ok=True)
    with _s3_endpoint(endpoint_url), tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri))
        verify_folder(got)
        for child in got.iterdir():
            child.rename(dst / child.name)
    return dst

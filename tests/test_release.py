"""Releases end to end on real components: a tiny pipeline folder (one component a symlink, as stage exports link
their frozen parts) published to a local folder store and to S3 (moto server), registered in MLflow (SQLite), fetched
back by ``models:/k5-video_lite@candidate``, verified against its manifest, loaded by diffusers and by our pipeline,
and generated from; the champion gate moving (or not) the ``champion`` alias."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import moto_s3_server
from test_release_gate import A, B, summary

from evaluation.model_card import ReleaseLineage, render_model_card
from k5data.object_store import LocalStore, open_store
from k5data.publish import MANIFEST, ManifestMismatch, build_manifest, publish_folder, read_manifest, verify_folder
from orchestration.registry import (
    CANDIDATE,
    CHAMPION,
    alias_version,
    apply_gate,
    download_release,
    model_name,
    register_release,
    release_status,
    resolve,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ("video_lite_t2i_lr", "video_lite_lr", "video_lite_mr_5s", "video_lite_mr_10s")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny T2V pipeline whose ``vae/`` is a link to a 'base pipeline' folder elsewhere."""
    from k5model.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("release_src")
    folder = build_tiny_pipeline(root / "pipeline", kind="t2v", seed=0)
    (root / "base").mkdir()
    shutil.move(folder / "vae", root / "base" / "vae")
    (folder / "vae").symlink_to(root / "base" / "vae", target_is_directory=True)
    return folder


@pytest.fixture
def tracking(tmp_path: Path) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("k5-test", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return uri, exp


def lineage_for(stage: str = "video_lite_mr_10s") -> ReleaseLineage:
    stages = STAGES[: STAGES.index(stage) + 1]
    return ReleaseLineage(family="video_lite", stage=stage, stages=stages,
                          training_run_ids={s: f"run-{s}" for s in stages}, dataset_snapshot="curated@1",
                          shard_index_uri="file:///shards/index.parquet", data={"samples": 12},
                          comparison="video_lite_mr_10s_vs_video_lite_t2i_lr", dagster_run_id="dagster-run-1")


def release(tracking: tuple[str, str], published, stage: str = "video_lite_mr_10s"):
    lineage = lineage_for(stage)
    card = render_model_card(name=model_name("video_lite"), lineage=lineage, source_uri=published.uri,
                             manifest_sha256=published.manifest.sha256, total_bytes=published.manifest.total_bytes,
                             summary=summary(0.8))
    return register_release(tracking[0], tracking[1], lineage=lineage, published=published, card=card)


def test_publish_follows_links_and_is_idempotent(pipeline: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    first = publish_folder(pipeline, store, "video_lite")
    manifest = first.manifest
    paths = [f.path for f in manifest.files]
    assert "model_index.json" in paths and any(p.startswith("vae/") for p in paths)  # the link was followed
    assert first.uploaded == len(paths) and MANIFEST not in paths
    prefix = f"releases/video_lite/{manifest.digest}"
    assert first.uri == store.uri(prefix) and first.uri.startswith("file://")
    stored = store.root / prefix
    assert not (stored / "vae").is_symlink() and (stored / "vae").is_dir()  # a self-contained copy
    assert read_manifest(stored) == manifest and verify_folder(stored) == manifest

    again = publish_folder(pipeline, store, "video_lite")
    assert (again.uri, again.uploaded) == (first.uri, 0)
    # a crash before the manifest: the next publish uploads only what is missing, then the manifest
    (stored / MANIFEST).unlink()
    (stored / "model_index.json").unlink()
    resumed = publish_folder(pipeline, store, "video_lite")
    assert (resumed.uri, resumed.uploaded) == (first.uri, 1) and verify_folder(stored) == manifest
    # a published (downloaded) copy republishes to the same place: its manifest.json is not content
    assert publish_folder(stored, store, "video_lite").uri == first.uri

    changed = tmp_path / "changed"
    shutil.copytree(pipeline, changed)  # copies the linked vae/ as real files
    (changed / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "changed"}')
    other = publish_folder(changed, store, "video_lite")
    assert other.uri != first.uri and other.uploaded == len(paths)


def test_verify_folder_names_the_first_mismatch(pipeline: Path, tmp_path: Path) -> None:
    manifest = build_manifest(pipeline)
    copy = tmp_path / "copy"
    shutil.copytree(pipeline, copy)
    assert verify_folder(copy, manifest) == manifest
    target = next(f for f in manifest.files if f.path.startswith("transformer/") and f.size > 100)
    data = bytearray((copy / target.path).read_bytes())
    data[50] ^= 1  # same size, one bit flipped
    (copy / target.path).write_bytes(bytes(data))
    with pytest.raises(ManifestMismatch, match="sha256") as err:
        verify_folder(copy, manifest)
    assert err.value.path == target.path
    shutil.copyfile(pipeline / target.path, copy / target.path)
    (copy / "vae" / "config.json").unlink()
    with pytest.raises(ManifestMismatch, match="missing") as err:
        verify_folder(copy, manifest)
    assert err.value.path == "vae/config.json"
    shutil.copyfile(pipeline / "vae" / "config.json", copy / "vae" / "config.json")
    (copy / "transformer" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ManifestMismatch, match="not listed") as err:
        verify_folder(copy, manifest)
    assert err.value.path == "transformer/extra.bin"


@pytest.mark.slow  # three generations on CPU
def test_release_downloads_by_alias_and_generates(pipeline: Path, tmp_path: Path, tracking) -> None:
    import mlflow
    import numpy as np
    import torch
    from click.testing import CliRunner
    from diffusers import Kandinsky5T2VPipeline
    from mlflow.tracking import MlflowClient

    from k5cli.main import main
    from k5model.pipeline import K5Pipeline

    published = publish_folder(pipeline, LocalStore(tmp_path / "store"), "video_lite")
    version = release(tracking, published)
    client = MlflowClient(tracking[0])
    mv = client.get_model_version("k5-video_lite", version.version)
    assert (version.name, version.reused) == ("k5-video_lite", False)
    assert mv.source == published.uri and CANDIDATE in mv.aliases  # the store URI itself: nothing was uploaded
    assert mv.tags["k5.parent_stage"] == "video_lite_mr_5s" and mv.tags["k5.dataset_snapshot"] == "curated@1"
    assert mv.tags["k5.training_run_ids"].startswith("video_lite_t2i_lr=run-video_lite_t2i_lr,")
    assert mv.tags["k5.sbs_comparison"] == "video_lite_mr_10s_vs_video_lite_t2i_lr"
    assert mv.tags["k5.manifest_sha256"] == published.manifest.sha256
    assert mv.description.startswith("# k5-video_lite: video_lite_mr_10s") and mv.run_id == version.run_id
    card = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="model_card.md",
                                                    tracking_uri=tracking[0]))
    assert card.read_text() == mv.description
    assert not list((tmp_path / "mlartifacts").rglob("*.safetensors"))  # weights never went to the tracking store
    # the same content again: the same version gets the alias, no duplicate
    assert release(tracking, published).version == version.version and release(tracking, published).reused

    got = download_release("models:/k5-video_lite@candidate", tmp_path / "dl", tracking[0])
    assert verify_folder(got) == published.manifest
    with pytest.raises(FileExistsError, match="not empty"):
        download_release("models:/k5-video_lite@candidate", got, tracking[0])
    # plain MLflow resolves the alias to the same folder (with the process-wide tracking URI set)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking[0])
    try:
        plain = Path(mlflow.artifacts.download_artifacts("models:/k5-video_lite@candidate",
                                                         dst_path=str(tmp_path / "p")))
    finally:
        mlflow.set_tracking_uri(before)
    assert verify_folder(plain) == published.manifest

    pipe = Kandinsky5T2VPipeline.from_pretrained(got, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt="a red fox runs through snow", height=64, width=64, num_frames=5, num_inference_steps=2,
                  output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]
    assert frames.shape == (5, 64, 64, 3) and np.isfinite(frames).all()
    ours = K5Pipeline.from_pretrained(got).generate("a red fox runs through snow", height=64, width=64, num_frames=5,
                                                    num_steps=2, seed=0, progress=False)
    assert tuple(ours.frames.shape)[0] == 5
    out = tmp_path / "clip.mp4"
    r = CliRunner().invoke(main, ["generate", str(got), "--prompt", "a fox", "--out", str(out), "--height", "64",
                                  "--width", "64", "--frames", "5", "--steps", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0


def test_gate_moves_champion_only_when_it_passes(pipeline: Path, tmp_path: Path, tracking) -> None:
    from mlflow.tracking import MlflowClient

    store = LocalStore(tmp_path / "store")
    name = "k5-video_lite"
    first = release(tracking, publish_folder(pipeline, store, "video_lite"))
    # no champion, margin the interval does not clear: keep, and no champion appears
    kept = apply_gate(tracking[0], name, first.version, summary(0.8), margin=0.9)
    assert not kept.promote and alias_version(tracking[0], name, CHAMPION) is None
    assert release_status(tracking[0], "video_lite")[2] == "@champion: none"
    assert release_status(tracking[0], "image_lite") == ["k5-image_lite: no release registered"]
    mv = MlflowClient(tracking[0]).get_model_version(name, first.version)
    assert mv.tags["k5.gate.decision"] == "keep" and "**keep**" in mv.description
    # no champion, clear win over the baseline: the first champion
    won = apply_gate(tracking[0], name, first.version, summary(0.8), margin=0.0)
    assert won.promote and "no champion yet" in won.reason
    status = release_status(tracking[0], "video_lite")
    assert (status[0] == f"k5-video_lite version 1 (@candidate): {first.source}"
            and status[1].startswith("gate: promote"))
    assert status[2].startswith("@champion: version 1")
    assert str(alias_version(tracking[0], name, CHAMPION).version) == first.version
    assert "already the champion" in apply_gate(tracking[0], name, first.version, summary(0.8)).reason

    # a second candidate (another stage's content) against the champion: the comparison must be against it
    changed = tmp_path / "changed"
    shutil.copytree(pipeline, changed)
    (changed / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text()), "shift": 3.0}))
    second = release(tracking, publish_folder(changed, store, "video_lite"), stage="video_lite_mr_5s")
    assert str(resolve(tracking[0], "models:/k5-video_lite@candidate").version) == second.version
    c2 = "stage:video_lite_mr_5s"
    wrong = apply_gate(tracking[0], name, second.version, summary(0.9, model_a=c2, model_b=B))
    assert not wrong.promote and "not against the champion" in wrong.reason  # B is not the champion (A is)
    loses = apply_gate(tracking[0], name, second.version, summary(0.4, model_a=c2, model_b=A))
    assert not loses.promote and str(alias_version(tracking[0], name, CHAMPION).version) == first.version
    beats = apply_gate(tracking[0], name, second.version, summary(0.85, model_a=c2, model_b=A), margin=0.2)
    assert beats.promote and str(alias_version(tracking[0], name, CHAMPION).version) == second.version


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.mark.slow  # moto server
def test_release_on_s3(pipeline: Path, tmp_path: Path, tracking, s3_endpoint: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                 "K5_S3_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    from k5data.sources import s3_client

    s3_client(s3_endpoint).create_bucket(Bucket="k5rel")
    store = open_store("s3://k5rel/objects")
    published = publish_folder(pipeline, store, "video_lite")
    local = publish_folder(pipeline, LocalStore(tmp_path / "store"), "video_lite")
    assert published.uri == f"s3://k5rel/objects/releases/video_lite/{local.manifest.digest}"  # same content, same key
    assert publish_folder(pipeline, store, "video_lite").uploaded == 0
    version = release(tracking, published)
    assert resolve(tracking[0], "models:/k5-video_lite@candidate").source == published.uri
    got = download_release("models:/k5-video_lite@candidate", tmp_path / "dl", tracking[0])
    assert verify_folder(got) == published.manifest and version.version == "1"
    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ  # set for the download only
    # a corrupted object in the bucket is caught at download, naming the file; nothing is left in dst
    key = f"objects/releases/video_lite/{local.manifest.digest}/model_index.json"
    s3_client(s3_endpoint).put_object(Bucket="k5rel", Key=key, Body=b"{}")
    with pytest.raises(ManifestMismatch) as err:
        download_release("models:/k5-video_lite/1", tmp_path / "dl2", tracking[0])
    assert err.value.path == "model_index.json" and not any((tmp_path / "dl2").iterdir())
    # the same content published to another store is another source: a new version; the S3 one again: reused
    assert (release(tracking, local).version, release(tracking, published).version) == ("2", "1")

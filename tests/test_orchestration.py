"""Orchestration end to end: real Dagster materializations (persistent SQLite instance in a tmp K5_HOME) and a real
MLflow SQLite store, inspected afterwards with MlflowClient."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import dagster as dg
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from assets.generation import demo_generation, demo_generation_is_not_degenerate
from assets.models import tiny_model_bundle
from evaluation.demo_generation import degeneracy_problems
from evaluation.prompts import load_moviegen
from k5model.media import read_video, save_media
from orchestration.resources import MLflowResource, ObjectStoreResource, default_resources
from orchestration.settings import DAGSTER_YAML, K5Paths, k5_home


@pytest.fixture
def k5_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> K5Paths:
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    paths = K5Paths.from_env().ensure()
    monkeypatch.setenv("DAGSTER_HOME", str(paths.dagster_home))
    return paths


def _file(uri: str) -> Path:
    parsed = urlparse(uri)
    assert parsed.scheme == "file", uri
    return Path(unquote(parsed.path))


def test_settings_paths_and_dagster_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("K5_HOME", raising=False)
    assert k5_home() == Path(__file__).resolve().parents[1] / ".k5"
    monkeypatch.setenv("K5_HOME", str(tmp_path / "home"))
    paths = K5Paths.from_env()
    assert paths.home == tmp_path / "home"
    assert paths.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert not paths.home.exists()
    paths.ensure()
    for d in (paths.dagster_home, paths.mlflow_artifacts, paths.object_store, paths.models):
        assert d.is_dir()
    text = (paths.dagster_home / "dagster.yaml").read_text()
    assert text == DAGSTER_YAML and "enabled: false" in text
    # The written file is a valid instance config: an instance opens on it and uses SQLite run storage there.
    monkeypatch.setenv("DAGSTER_HOME", str(paths.dagster_home))
    with dg.DagsterInstance.get() as instance:
        assert not instance.is_ephemeral
        assert instance.get_runs() == []
    assert (paths.dagster_home / "history" / "runs.db").exists()


def test_object_store_roundtrip(tmp_path: Path) -> None:
    store = ObjectStoreResource(base_uri=(tmp_path / "objs").as_uri())
    src = tmp_path / "a.bin"
    src.write_bytes(b"hello")
    assert not store.exists("x/a.bin")
    uri = store.put_file(src, "x/a.bin")
    assert uri == store.uri("x/a.bin") and _file(uri) == tmp_path / "objs" / "x" / "a.bin"
    assert store.exists("x/a.bin")
    assert store.get_file("x/a.bin", tmp_path / "back.bin").read_bytes() == b"hello"
    for bad in ("", "/abs", "../up", "a//b", "a/./b"):
        with pytest.raises(ValueError, match="invalid object key"):
            store.put_file(src, bad)
    with pytest.raises(FileNotFoundError):
        store.get_file("missing", tmp_path / "m")
    # s3:// is served by k5data.object_store.S3Store (tests/test_latents.py)
    with pytest.raises(ValueError, match="gs"):
        ObjectStoreResource(base_uri="gs://bucket/prefix").exists("k")


def test_definitions_jobs_cover_everything() -> None:
    from orchestration.definitions import defs

    # Supersets: later issues add asset modules and resources to the same Definitions.
    graph = defs.resolve_asset_graph()
    assert graph.get_all_asset_keys() >= {tiny_model_bundle.key, demo_generation.key}
    assert "demo_generation_is_not_degenerate" in {c.name for c in graph.asset_check_keys}
    # The demo runs these three jobs; together they materialize every asset the code location defines, and
    # main_job holds no partitioned asset (it runs without a partition key).
    jobs = {name: set(defs.resolve_job_def(name).asset_layer.executable_asset_keys)
            for name in ("main_job", "curation_shards_job", "sbs_job", "release_job", "sft_partitions_job",
                         "sft_models_job", "sft_soup_job", "distill_job", "rl_job")}
    assert set().union(*jobs.values()) == set(graph.materializable_asset_keys)
    assert not any(graph.get(key).is_partitioned for key in jobs["main_job"])
    assert set(defs.resources) >= {"k5_home", "mlflow", "object_store"}


def test_degeneracy_problems_flags_broken_clips() -> None:
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (5, 64, 64, 3)).astype(np.float32)
    lat = np.zeros((1, 2, 8, 8, 16), np.float32)
    assert degeneracy_problems(good, lat, (5, 64, 64, 3)) == []
    assert any("constant" in p for p in degeneracy_problems(np.full_like(good, 7), lat, (5, 64, 64, 3)))
    assert any("expected" in p for p in degeneracy_problems(good, lat, (9, 64, 64, 3)))
    assert any("non-finite" in p for p in degeneracy_problems(good, lat * np.nan, (5, 64, 64, 3)))


def test_materialize_demo_generation(k5_env: K5Paths, tiny_t2v_dir: Path) -> None:
    paths = k5_env
    # Seed the model folder with the session's tiny build (saves ~20 s of tokenizer training); the asset still calls
    # build_tiny_pipeline, which validates and reuses a complete folder of the same kind/seed.
    shutil.copytree(tiny_t2v_dir, paths.models / "tiny_t2v")
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [tiny_model_bundle, demo_generation, demo_generation_is_not_degenerate],
            resources=default_resources(),
            instance=instance,
        )
        assert result.success
        checks = result.get_asset_check_evaluations()
        assert [(c.check_name, c.passed) for c in checks] == [("demo_generation_is_not_degenerate", True)]
        # Persisted in the tmp instance, so the Dagster UI would show it.
        assert instance.get_latest_materialization_event(demo_generation.key) is not None

    bundle = result.asset_materializations_for_node("tiny_model_bundle")[0].metadata
    assert Path(bundle["path"].value) == paths.models / "tiny_t2v"
    components = bundle["components"].value
    assert {"transformer", "text_encoder", "vae"} <= set(components) and components["transformer"] > 0
    assert bundle["parameter_count"].value == sum(components.values())

    meta = {k: v.value for k, v in result.asset_materializations_for_node("demo_generation")[0].metadata.items()}
    assert len(meta["media"]) == 2
    for uri in meta["media"]:
        path = _file(uri)
        assert path.is_relative_to(paths.object_store) and path.suffix == ".mp4"
        frames = read_video(path)
        assert frames.shape == (5, 64, 64, 3) and frames.std() > 1.0
    assert meta["preview"].startswith("![filmstrip](data:image/png;base64,")

    client = MlflowClient(paths.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("k5-lifecycle")
    assert exp is not None and _file(exp.artifact_location).is_relative_to(paths.mlflow_artifacts)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert meta["mlflow_run_id"] == run.info.run_id
    assert meta["mlflow_run_url"] == (
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    )
    prompts = load_moviegen(limit=2)
    p = run.data.params
    assert p["prompt_0"] == prompts[0].prompt and p["prompt_1"] == prompts[1].prompt
    assert (p["num_steps"], p["guidance_scale"], p["seed"], p["resolution"]) == ("4", "5.0", "0", "64x64x5")
    m = run.data.metrics
    assert m["total_seconds"] > 0 and m["seconds_per_step"] > 0 and m["mean_seconds_per_step"] > 0
    assert len(client.get_metric_history(run.info.run_id, "seconds_per_step")) == 2
    assert run.data.tags["dagster_run_id"] == result.run_id
    media = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "media")}
    assert media == {"video_00.mp4", "video_01.mp4"}
    assert (_file(run.info.artifact_uri) / "media" / "video_00.mp4").stat().st_size > 0
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"preview.png", "generation.json"} <= top


def test_check_fails_on_constant_media(k5_env: K5Paths, tmp_path: Path) -> None:
    """The asset check, run by Dagster against a recorded materialization whose stored clip is flat."""
    store = ObjectStoreResource()
    clip = save_media(np.full((5, 64, 64, 3), 128, np.uint8), tmp_path / "flat.mp4")
    np.save(tmp_path / "lat.npy", np.zeros((1, 2, 8, 8, 16), np.float32))
    store.put_file(clip, "t/flat.mp4")
    store.put_file(tmp_path / "lat.npy", "t/lat.npy")
    with dg.DagsterInstance.get() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            demo_generation.key,
            metadata={"media_keys": ["t/flat.mp4"], "latent_keys": ["t/lat.npy"], "frame_shape": [5, 64, 64, 3]},
        ))
        result = dg.materialize(
            [demo_generation, demo_generation_is_not_degenerate],
            selection=dg.AssetSelection.checks(demo_generation_is_not_degenerate),
            resources=default_resources(),
            instance=instance,
            raise_on_error=False,
        )
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 1 and not checks[0].passed
    assert "constant" in checks[0].description


def test_infra_dagster_yaml_is_a_valid_instance_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The production template (Postgres, Kubernetes run launcher) passes Dagster's instance schema, and every class
    it names imports and accepts its config. tests/test_postgres_instance.py runs it against a real server."""
    import re

    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config

    infra = Path(__file__).resolve().parents[1] / "infra"
    env_refs = set(re.findall(r"env: (\w+)", (infra / "dagster.yaml").read_text()))
    assert {"DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD"} <= env_refs
    for var in env_refs:
        monkeypatch.setenv(var, "5432" if var == "DAGSTER_PG_PORT" else "x")
    cfg, _ = dagster_instance_config(str(infra), "dagster.yaml")
    assert set(cfg["storage"]["postgres"]["postgres_db"]) >= {"hostname", "db_name", "username", "password"}
    assert cfg["run_launcher"]["class"] == "K8sRunLauncher"
    assert cfg["telemetry"] == {"enabled": False}
    raw = yaml.safe_load((infra / "dagster.yaml").read_text())
    for key in ("run_coordinator", "run_launcher", "compute_logs", "local_artifact_storage"):
        cls = getattr(importlib.import_module(raw[key]["module"]), raw[key]["class"])
        result = validate_config(cls.config_type(), raw[key].get("config", {}))
        assert result.success, (key, result.errors)


def test_mlflow_resource_experiment_location_and_uri_restore(k5_env: K5Paths) -> None:
    import mlflow

    res = MLflowResource(experiment_name="unit")
    mlflow.set_tracking_uri(f"sqlite:///{k5_env.home / 'other.db'}")
    with res.start_run("r", tags={"t": "1"}) as run:
        assert mlflow.get_tracking_uri() == k5_env.mlflow_tracking_uri
        mlflow.log_param("p", 1)
    assert mlflow.get_tracking_uri() == f"sqlite:///{k5_env.home / 'other.db'}"  # restored for the rest of the process
    client = MlflowClient(k5_env.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("unit")
    assert exp.artifact_location == (k5_env.mlflow_artifacts / "unit").as_uri()
    assert client.get_run(run.info.run_id).data.tags["t"] == "1"
    assert res.experiment_id() == exp.experiment_id  # found, not created twice
    # Against a tracking server the server owns the artifact store: no local path is forced on it.
    assert MLflowResource(tracking_uri="http://mlflow:5000")._artifact_root() is None

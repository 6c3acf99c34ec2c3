"""The ``release`` asset and its blocking ``champion_gate`` check in process, on recorded upstream lineage: stage and
SBS materializations reported to the instance as the real assets record them. The gate keeps (margin too high: no
champion appears), then promotes; the registered version carries the lineage the stage assets recorded."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient
from test_release_gate import summary

from assets.release import FAMILIES, ReleaseConfig, champion_gate, release, stage_and_comparison
from orchestration.registry import alias_version
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource

STAGES = ("video_lite_t2i_lr", "video_lite_lr", "video_lite_mr_5s", "video_lite_mr_10s")
COMPARISON = "video_lite_mr_10s_vs_video_lite_t2i_lr"

pytestmark = pytest.mark.slow  # two in-process runs on MLflow + a tiny pipeline: ~1 min on a busy 2-core box


@pytest.fixture
def recorded(tmp_path: Path):
    """An instance holding the upstream materializations: every Video Lite stage (run ids; the last one with its
    pipeline folder and data lineage) and the SBS report of the demo comparison (its summary on disk)."""
    from k5model.tiny import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path / "export" / "pipeline", kind="t2v", seed=0)
    summary_path = tmp_path / "sbs" / COMPARISON / "report" / "summary.json"
    summary_path.parent.mkdir(parents=True)
    summary_path.write_text(json.dumps(summary(0.8, simulated=True)))
    with dg.instance_for_test() as instance:
        for stage in STAGES:
            meta = {"mlflow_run_id": f"run-{stage}"}
            if stage == STAGES[-1]:
                meta |= {"pipeline_dir": str(folder), "dataset_snapshot": "curated@7", "samples_consumed": 24,
                         "shard_index_uri": "file:///shards/index.parquet"}
            instance.report_runless_asset_event(dg.AssetMaterialization(f"train_{stage}", metadata=meta))
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "sbs_report", partition=COMPARISON, metadata={"summary_path": str(summary_path)}))
        yield instance


def run_release(instance: dg.DagsterInstance, tmp_path: Path, margin: float) -> dg.ExecuteInProcessResult:
    resources = {"k5_home": K5HomeResource(home=str(tmp_path / "home")),
                 "mlflow": MLflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                          artifact_location=str(tmp_path / "mlartifacts")),
                 "object_store": ObjectStoreResource(base_uri=str(tmp_path / "objects"))}
    return dg.materialize([release, champion_gate], instance=instance, resources=resources, partition_key="video_lite",
                          run_config={"ops": {"release": {"config": {"margin": margin}}}}, raise_on_error=False)


def check_eval(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_release_asset_and_gate_both_ways(recorded: dg.DagsterInstance, tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert FAMILIES.get_partition_keys() == ["video_lite", "image_lite", "video_pro"]

    kept = run_release(recorded, tmp_path, margin=0.9)
    (mat,) = kept.asset_materializations_for_node("release")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["model"] == "k5-video_lite" and meta["version"] == "1" and meta["stage"] == "video_lite_mr_10s"
    assert meta["comparison"] == COMPARISON and meta["source_uri"].startswith((tmp_path / "objects").as_uri())
    gate = check_eval(kept)
    assert not gate.passed and gate.metadata["decision"].value == "keep"
    assert "no champion yet" in gate.metadata["reason"].value and gate.metadata["champion_now"].value == "none"
    assert gate.metadata["simulated_judgments"].value is True
    # blocking: a keep fails the check's step (and so the run); the release step succeeded, the candidate stands
    (failure,) = kept.get_step_failure_events()
    assert "champion_gate" in failure.step_key and kept.is_node_success("release")
    assert alias_version(f"sqlite:///{tmp_path / 'mlflow.db'}", "k5-video_lite", "champion") is None

    version = client.get_model_version("k5-video_lite", "1")
    assert version.aliases == ["candidate"] and version.source == meta["source_uri"]
    assert version.tags["k5.training_run_ids"] == ",".join(f"{s}=run-{s}" for s in STAGES)
    assert version.tags["k5.dataset_snapshot"] == "curated@7" and version.tags["k5.gate.decision"] == "keep"
    assert version.tags["k5.dagster_run_id"] == kept.run_id and "samples consumed: 24" in version.description
    assert client.get_run(version.run_id).data.tags["dagster_run_id"] == kept.run_id  # MLflow -> Dagster link
    assert "64x64x5 frames, 4 steps, cpu" in version.description  # latency measured on the released folder

    promoted = run_release(recorded, tmp_path, margin=0.0)
    assert promoted.success
    again = {k: v.value for k, v in promoted.asset_materializations_for_node("release")[0].metadata.items()}
    assert again["version"] == "1" and again["reused_version"] is True and again["uploaded_files"] == 0
    gate = check_eval(promoted)
    assert (gate.passed and gate.metadata["decision"].value == "promote"
            and gate.metadata["champion_now"].value == "version 1")
    assert set(client.get_model_version("k5-video_lite", "1").aliases) == {"candidate", "champion"}


def test_definitions_wire_release_into_the_lineage() -> None:
    from orchestration.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("release")).parent_keys}
    assert {"sbs_report", "train_video_lite_mr_10s"} <= parents
    release_job = defs.resolve_job_def("release_job")
    assert {k.name for k in release_job.asset_layer.asset_graph.asset_check_keys} >= {"champion_gate"}
    main_nodes = set(defs.resolve_job_def("main_job").graph.node_dict)
    assert "release" not in main_nodes and not any("champion_gate" in n for n in main_nodes)
    (spec,) = champion_gate.check_specs
    assert spec.blocking and spec.description and spec.partitions_def == FAMILIES


def test_release_config_resolves_stage_and_gating_comparison() -> None:
    assert stage_and_comparison("video_lite", ReleaseConfig()) == ("video_lite_mr_10s", COMPARISON)
    # no last-vs-first comparison registered for Image Lite: the stage against its parent
    assert stage_and_comparison("image_lite", ReleaseConfig()) == ("image_edit_hr", "image_edit_hr_vs_image_edit_mr")
    assert stage_and_comparison("video_lite", ReleaseConfig(stage="video_lite_lr"))[1] == \
        "video_lite_lr_vs_video_lite_t2i_lr"
    for bad, needle in ((ReleaseConfig(stage="image_lite_lr"), "not in the video_lite chain"),
                        (ReleaseConfig(stage="video_lite_t2i_lr"), "no SBS comparison of video_lite_t2i_lr"),
                        (ReleaseConfig(comparison="video_lite_lr_vs_video_lite_t2i_lr"), "no SBS comparison"),
                        (ReleaseConfig(groups=["visual_1"]), "choose one or more")):
        with pytest.raises(dg.Failure, match=needle):
            stage_and_comparison("video_lite", bad)

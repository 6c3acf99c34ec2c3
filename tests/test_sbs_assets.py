"""The SBS assets end to end on stand-in stage exports: partitions, batch (sizes both models accept), report from the
judgments store with and without configured simulation, MLflow on the stages' runs, overlap checks both ways,
``k5 sbs export`` -> ``k5 sbs score``."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from assets.sbs import SBS_STAGE_DEPS, sbs_batch, sbs_partitions, sbs_report
from evaluation.sbs.comparisons import COMPARISONS, DEMO_COMPARISON, offered
from evaluation.sbs.sbs_plan import Plan, coverage
from k5cli.sbs import sbs
from orchestration.lineage import stage_pipeline_dir
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource
from orchestration.settings import K5Paths

pytestmark = pytest.mark.slow  # generation with two pipelines and several materializations: ~40 s

DEMO_A, DEMO_B = COMPARISONS[DEMO_COMPARISON].model_a.ref, COMPARISONS[DEMO_COMPARISON].model_b.ref


def stand_in_stage(instance: dg.DagsterInstance, folder: Path, stage: str, seed: int, *, nabla: bool = False,
                   record: bool = True, mlflow_run_id: str | None = None) -> Path:
    """Until the stage exports land: a tiny pipeline folder standing in for ``train_<stage>``'s export, and (with
    ``record``) a materialization of ``train_<stage>`` carrying its ``pipeline_dir`` as the real asset would."""
    from k5model.tiny import build_tiny_pipeline

    build_tiny_pipeline(folder, kind="t2v", seed=seed)
    if nabla:  # like video_lite_mr_10s: NABLA attention, generation sizes in multiples of 128 px
        cfg_path = folder / "transformer" / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "attention_type": "nabla"}))
    if record:
        meta = {"pipeline_dir": str(folder), **({"mlflow_run_id": mlflow_run_id} if mlflow_run_id else {})}
        instance.report_runless_asset_event(dg.AssetMaterialization(f"train_{stage}", metadata=meta))
    return folder


def sbs_resources(tmp_path: Path, home: Path) -> dict:
    return {"k5_home": K5HomeResource(home=str(home)),
            "mlflow": MLflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                     artifact_location=str(tmp_path / "mlartifacts")),
            "object_store": ObjectStoreResource(base_uri=str(tmp_path / "objects"))}


def demo_stages(instance: dg.DagsterInstance, home: Path, stage_runs: dict[str, str] | None = None) -> None:
    """Model A (last Video Lite stage, NABLA) recorded with its pipeline_dir somewhere else; model B found only
    through the conventional stage folder (no materialization recorded): both resolution routes."""
    stage_runs = stage_runs or {}
    stand_in_stage(instance, home / "elsewhere" / DEMO_A, DEMO_A, seed=0, nabla=True,
                   mlflow_run_id=stage_runs.get(DEMO_A))
    stand_in_stage(instance, stage_pipeline_dir(K5Paths(home), DEMO_B), DEMO_B, seed=1, record=False)


def test_only_comparisons_that_can_succeed_are_offered() -> None:
    from k5model.training.stages import CHAINS, TABLE4
    from orchestration.definitions import defs

    keys = sbs_partitions.get_partition_keys()
    assert DEMO_COMPARISON == f"{CHAINS['video_lite'][-1]}_vs_{CHAINS['video_lite'][0]}" and DEMO_COMPARISON in keys
    assert "sft_soup_vs_pretrain" not in keys and "demo_tiny_seed0_vs_seed1" not in keys
    for key in keys:
        # stages, the SFT models the sft_soup asset records (soup_vs_pretrain, soup_vs_best_single_domain), or a
        # model recorded by its own asset (flash_vs_<teacher>: flash; rl_vs_soup: rl_model)
        assert all((m.kind == "stage" and m.ref in TABLE4) or (m.kind == "sft" and m.asset_key == "sft_soup")
                   or (m.kind in ("distill", "rl") and m.asset_key in SBS_STAGE_DEPS) for m in COMPARISONS[key].models)
    assert {"soup_vs_pretrain", "soup_vs_best_single_domain", f"flash_vs_{CHAINS['video_lite'][-1]}"} <= set(keys)
    # the graph: sbs_batch depends on exactly the stage assets its comparisons use, and they exist
    graph_keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    deps = {d.asset_key.to_user_string() for d in sbs_batch.specs_by_key[dg.AssetKey("sbs_batch")].deps}
    assert deps == set(SBS_STAGE_DEPS) and deps <= graph_keys
    assert defs.resolve_job_def("sbs_job").partitions_def.get_partition_keys() == keys
    # every check of the SBS assets says what it checks
    assert all(spec.description for spec in sbs_batch.check_specs) and all(spec.description for spec in
                                                                          sbs_report.check_specs)


def test_folder_model_offered_only_when_the_folder_is_a_pipeline(tmp_path: Path) -> None:
    from evaluation.sbs.comparisons import Comparison, LineageModel

    released = tmp_path / "released_v1"
    comp = Comparison(model_a=LineageModel.parse(f"stage:{DEMO_A}"), model_b=LineageModel.parse(f"folder:{released}"),
                      prompt_set="moviegen")
    assert comp.key == f"{DEMO_A}_vs_released_v1"
    assert offered([comp]) == []  # nothing there yet: not offered
    released.mkdir()
    (released / "model_index.json").write_text("{}")
    assert offered([comp]) == [comp.key]
    with pytest.raises(ValueError, match="not a Table 4 stage"):
        LineageModel.parse("stage:sft_soup")
    with pytest.raises(ValueError, match="absolute"):
        LineageModel.parse("folder:relative/dir")


def test_missing_stage_export_fails_with_what_to_materialize(tmp_path: Path) -> None:
    home = tmp_path / "k5"
    with dg.instance_for_test() as instance:
        res = dg.materialize([sbs_batch], partition_key=DEMO_COMPARISON, resources=sbs_resources(tmp_path, home),
                             instance=instance, raise_on_error=False)
    assert not res.success
    [failure] = [e for e in res.all_events if e.is_step_failure]
    assert f"materialize train_{DEMO_A} first" in failure.step_failure_data.error.to_string()


def test_batch_and_report_score_the_store_and_simulate_only_when_configured(tmp_path: Path) -> None:
    home = tmp_path / "k5"
    resources = sbs_resources(tmp_path, home)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("k5-lifecycle", artifact_location=str(tmp_path / "mlartifacts" / "k5-lifecycle"))
    stage_run = client.create_run(exp, run_name=f"train/{DEMO_A}").info.run_id  # model A's training run
    annotators = [f"ann{k}" for k in range(5)]
    batch_cfg = {"subset_size": 2, "annotators": annotators, "overlap": 5, "num_steps": 2, "num_frames": 5}
    with dg.instance_for_test() as instance:
        demo_stages(instance, home, {DEMO_A: stage_run})

        def report(config: dict) -> tuple[dg.ExecuteInProcessResult, dict]:
            r = dg.materialize([sbs_report], partition_key=DEMO_COMPARISON, resources=resources, instance=instance,
                               run_config={"ops": {"sbs_report": {"config": {"n_boot": 100, **config}}}})
            meta = {k: v.value for m in r.asset_materializations_for_node("sbs_report") for k, v in m.metadata.items()}
            return r, meta

        res = dg.materialize([sbs_batch], partition_key=DEMO_COMPARISON, resources=resources, instance=instance,
                             run_config={"ops": {"sbs_batch": {"config": batch_cfg}}})
        assert res.success
        root = home / "sbs" / DEMO_COMPARISON
        plan = Plan.from_json((root / "plan.json").read_text())
        assert len(plan.items) == 4 and len(plan.golden_map()) == 2
        assert all(n == 5 for n in coverage(plan).values())
        # the NABLA stage needs multiples of 128 px: the requested 64x64 was rounded up for both models
        assert (plan.meta["generation"]["height"], plan.meta["generation"]["width"]) == (128, 128)
        assert plan.meta["model_a_dir"] == str(home / "elsewhere" / DEMO_A)
        assert plan.meta["model_b_dir"] == str(stage_pipeline_dir(K5Paths(home), DEMO_B))
        for item in plan.items:
            assert (root / "media" / item.media_a).is_file() and (root / "media" / item.media_b).is_file()
        assert (tmp_path / "objects" / "sbs" / DEMO_COMPARISON / "plan.json").is_file()
        [check] = res.get_asset_check_evaluations()
        assert check.check_name == "plan_overlap" and check.passed

        # 1. nobody has judged yet and simulation is not configured: no scores, and the overlap check fails
        res, meta = report({})
        [check] = res.get_asset_check_evaluations()
        assert not check.passed
        summary = json.loads((root / "report" / "summary.json").read_text())
        assert summary["n_judgments"] == 0 and summary["simulated"] is False
        assert summary["judgments_source"] == "store" and meta["summary_path"] == str(root / "report" / "summary.json")

        # 2. the demo's configured simulation: written through the store, labelled everywhere
        res, meta = report({"simulate": True})
        [check] = res.get_asset_check_evaluations()
        assert check.passed
        summary = json.loads((root / "report" / "summary.json").read_text())
        assert summary["simulated"] is True and summary["judgments_source"] == "simulated"
        assert (summary["comparison"] == DEMO_COMPARISON
                and (summary["model_a"], summary["model_b"]) == (f"stage:{DEMO_A}", f"stage:{DEMO_B}"))
        assert all(a.startswith("simulated:") for a in summary["annotators"])
        assert summary["overall_visual_quality"]["model1"] > 0 and summary["n_items"] == 2
        lo, hi = summary["ci95"]["overall_visual_quality"]["model1"]
        assert lo <= summary["overall_visual_quality"]["model1"] <= hi
        assert meta["simulated"] is True and meta["overall"]["overall_visual_quality"]["ci95"]["model1"] == [lo, hi]
        assert "SIMULATED" in (root / "report" / "sbs_report.html").read_text()

        # MLflow: the report run is tagged simulated; model A's side lands on its training run
        # oldest first, so the dict keeps the latest run of each name
        runs = {r.info.run_name: r for r in client.search_runs([exp], order_by=["attributes.start_time ASC"])}
        assert runs[f"sbs_report/{DEMO_COMPARISON}"].data.tags["k5_simulated"] == "true"
        a_run = client.get_run(stage_run)
        assert a_run.data.metrics[f"sbs.{DEMO_COMPARISON}.overall_visual_quality"] == \
            summary["overall_visual_quality"]["model1"]
        assert runs[f"model/{DEMO_B}"].data.metrics[f"sbs.{DEMO_COMPARISON}.overall_visual_quality"] == \
            summary["overall_visual_quality"]["model2"]

        # export -> k5 sbs score: the same overall scores as the report (simulated rows asked for explicitly)
        out = tmp_path / "export.csv"
        db, plan_json = str(root / "judgments.duckdb"), str(root / "plan.json")
        cli = CliRunner().invoke(sbs, ["export", "--db", db, "--plan", plan_json, "--include-simulated", str(out)])
        assert cli.exit_code == 0, cli.output
        exported = pd.read_csv(out, dtype=str)
        assert list(exported.columns) == ["item_id", "annotator", "criterion", "choice"]
        assert not set(exported["item_id"]) & set(plan.golden_map())
        scored = json.loads(CliRunner().invoke(sbs, ["score", str(out)]).stdout)
        for group in ("overall_visual_quality", "overall_motion", "overall_prompt_following"):
            assert scored[group] == pytest.approx(summary[group])
        cli = CliRunner().invoke(sbs, ["export", "--db", db, "--plan", plan_json, str(out)])
        assert cli.exit_code == 0 and len(pd.read_csv(out)) == 0  # without the flag: people's judgments only

        # 3. simulation not configured again: the simulated rows stay in the store but out of the scores
        res, _ = report({})
        summary = json.loads((root / "report" / "summary.json").read_text())
        assert summary["n_judgments"] == 0 and summary["simulated"] is False

        # 4. an exported table with only 2 annotators per pair: the overlap check fails; invalid rows are listed
        rows = [(i.item_id, a, "visual_1", "model1_better") for i in plan.items for a in annotators[:2]]
        rows.append((plan.items[0].item_id, "ann0", "visual_99", "equally"))
        path = tmp_path / "other_platform.csv"
        pd.DataFrame(rows, columns=["item_id", "annotator", "criterion", "choice"]).to_csv(path, index=False)
        res, meta = report({"judgments_path": str(path)})
        [check] = res.get_asset_check_evaluations()
        assert not check.passed and check.metadata["under_covered_pairs"].value == 2
        summary = json.loads((root / "report" / "summary.json").read_text())
        assert summary["invalid_rows"] == [len(rows) + 1] and summary["judgments_source"] == str(path)

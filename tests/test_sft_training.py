"""SFT fine-tunes as Dagster assets (report §6.4): the SFT mix split into partitions with caption variants from a
tiny random LM (the production class, the same load path), one fine-tune per partition through the stages' Pipes job
from a pre-trained stage's EMA weights, early-stopped on the validation flow-matching loss, one MLflow run each;
then the soup of the partitions, exported as a complete pipeline and scored on the union of the validation items."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from lineage_fixtures import SHAPES, record_training_upstream
from mlflow.tracking import MlflowClient

from assets.sft_models import SFT_PARTITIONS, sft_models, sft_partitions, sft_soup
from assets.training import stage_assets
from k5model.soup import read_soup_metadata
from k5model.training.caption_variants import VARIANTS_PREFIX
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource, TrainingJobResource
from orchestration.settings import K5Paths

RESOURCES = {"k5_home": K5HomeResource(), "mlflow": MLflowResource(), "object_store": ObjectStoreResource(),
             "training_job": TrainingJobResource()}
START = "video_lite_t2i_lr"  # the root stage: image-only, so the SFT partitions below are image domains


def _mix(path: Path) -> Path:
    """An SFT mix in the annotation half's columns: the test shards' images, two domains, v1 rows drawn twice as
    often as v2-only rows."""
    rows = []
    for modality, res_class, shape in SHAPES:
        for k in range(4):
            media = f"{modality}-{res_class}-{'x'.join(map(str, shape))}"
            domain = "animals" if res_class == "low" else "food"
            rows.append({"item_id": f"{media}#{k}", "media_id": media, "scene_index": k, "kind": modality,
                         "domain": domain, "caption": f"The image shows a {domain} scene number {k}. "
                         f"На изображении сцена номер {k}.", "in_v1": k < 2, "in_v2": True,
                         "sample_prob": 2.0 if k < 2 else 1.0})
    df = pd.DataFrame(rows)
    df["sample_prob"] /= df["sample_prob"].sum()
    df.to_parquet(path)
    return path


@pytest.mark.slow
def test_sft_partitions_finetunes_and_soup(tmp_path, monkeypatch, tiny_t2v_dir, tiny_t2i_dir):
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    instance = dg.DagsterInstance.ephemeral()
    paths = K5Paths.from_env().ensure()
    record_training_upstream(instance, paths.object_store, tiny_t2v_dir, tiny_t2i_dir)
    instance.report_runless_asset_event(dg.AssetMaterialization("sft_mix", metadata={
        "path": str(_mix(tmp_path / "mix.parquet"))}))
    root = [a for a in stage_assets if a.key.to_user_string() == f"train_{START}"]
    assert dg.materialize(root, resources=RESOURCES, instance=instance).success

    config = {"sft_partitions": {"config": {"kinds": ["image"], "max_partitions": 2, "max_new_tokens": 4}}}
    part = dg.materialize([sft_partitions], resources=RESOURCES, instance=instance, run_config={"ops": config})
    keys = sorted(instance.get_dynamic_partitions(SFT_PARTITIONS.name))
    assert keys == ["video_lite.animals", "video_lite.food"]
    plan = json.loads(Path(part.asset_materializations_for_node("sft_partitions")[0].metadata["plan_path"].value)
                      .read_text())
    layout = {p["key"]: p for p in plan["partitions"]}["video_lite.animals"]
    assert layout["size"] == 4 and len(layout["val_ids"]) == 1  # 25 % held out
    assert sum(layout["repeats"].values()) > len(layout["train_ids"])  # v1 rows repeated by the mix probabilities
    assert plan["variant_sources"]["en/extractive"] > 0 and plan["variant_sources"]["ru/extractive"] > 0
    from k5data.sft.dataset import read_samples

    sample = next(iter(read_samples(ObjectStoreResource().store(), layout["prefix"]).values()))
    variants = json.loads(sample.caption[len(VARIANTS_PREFIX):])
    assert set(variants) == {"en", "ru"} and len(variants["en"]) == 5

    models_config = {"ops": {"sft_models": {"config": {"start_stage": START, "steps_per_round": 1, "max_rounds": 2,
                                                       "lr": 1e-3}}}}
    metas = {}
    for key in keys:  # the second partition: one round without samples (keeps the test short)
        if key != keys[0]:
            models_config["ops"]["sft_models"]["config"].update(max_rounds=1, samples=False)
        result = dg.materialize([sft_models], resources=RESOURCES, instance=instance, partition_key=key,
                                run_config=models_config, selection=[sft_models])
        assert result.success
        metas[key] = {k: v.value for k, v in result.asset_materializations_for_node("sft_models")[0].metadata.items()}
    client = MlflowClient(MLflowResource().resolved_tracking_uri())
    for key, meta in metas.items():
        assert meta["partition"] == key and meta["start_stage"] == START and 1 <= meta["rounds"] <= 2
        assert (meta["history"][0]["artifact_score"] is not None) == (key == keys[0])
        assert meta["best_val_loss"] == min(h["val_loss"] for h in meta["history"])
        assert Path(meta["pipeline_dir"], "model_index.json").is_file()
        assert Path(meta["pipeline_dir"], "vae", "config.json").is_file()  # exported in the work folder, links intact
        assert not Path(meta["pipeline_dir"]).parent.with_name(f".{key}.partial").exists()
        run = client.get_run(meta["mlflow_run_id"])
        assert run.data.tags["k5_partition"] == key and run.data.params["job.lr"] == "0.001"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_flow_matching_loss")] == \
            [h["step"] for h in meta["history"]]
    assert len({m["mlflow_run_id"] for m in metas.values()}) == 2  # one run per partition

    soup = dg.materialize([sft_soup], resources=RESOURCES, instance=instance)
    meta = {k: v.value for k, v in soup.asset_materializations_for_node("sft_soup")[0].metadata.items()}
    assert meta["weights"] == pytest.approx({k: 0.5 for k in keys})  # video: uniform over the domains
    assert set(meta["member_val_loss"]) == set(keys)
    recorded = read_soup_metadata(meta["transformer_dir"])
    assert [m["weight"] for m in recorded["members"]] == pytest.approx([0.5, 0.5])
    assert Path(meta["pipeline_dir"], "vae").is_symlink()
    run = client.get_run(meta["mlflow_run_id"])
    assert json.loads(run.data.tags["k5_soup_weights"]) == pytest.approx(meta["weights"])
    print(f"soup validation loss {meta['soup_val_loss']:.5f}, members' mean {meta['members_mean_val_loss']:.5f}")

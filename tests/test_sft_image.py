"""Image-family SFT end to end at tiny scale (report §6.4.1): ``image_lite`` partitions are subdomains chosen by
silhouette inside each VLM domain (images only, in the image VAE's latent set); each fine-tunes through the stages'
Pipes job from an image checkpoint (here the image bundle's released transformer, recorded as the start stage's
materialization) with the production image settings, batch 64 and lr 1e-5; the soup is hierarchical (subdomains by
sqrt size inside their domain, then the domains) flattened into one weighted pass and exported as an image pipeline
(the three-level weights with several domains: tests/test_sft_soup.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from lineage_fixtures import SHAPES, record_training_upstream
from mlflow.tracking import MlflowClient

from assets.sft_models import PRODUCTION_SFT, SFT_PARTITIONS, SftModelsConfig, sft_models, sft_partitions, sft_soup
from k5model.soup import read_soup_metadata
from orchestration.resources import K5HomeResource, MLflowResource, ObjectStoreResource, TrainingJobResource
from orchestration.settings import K5Paths

RESOURCES = {"k5_home": K5HomeResource(), "mlflow": MLflowResource(), "object_store": ObjectStoreResource(),
             "training_job": TrainingJobResource()}
START = "image_lite_lr"


def _image_mix(path: Path) -> Path:
    """Images only: 'animals' holds the 4 low and 2 of the medium test images (6 items: splittable), 'food' the
    other 2 medium ones (too few to split: one subdomain). Two rows carry a Russian sentence."""
    rows = []
    for modality, res_class, shape in SHAPES:
        if modality != "image":
            continue
        media = f"{modality}-{res_class}-{'x'.join(map(str, shape))}"
        for k in range(4):
            domain = "food" if res_class == "medium" and k >= 2 else "animals"
            rows.append({"item_id": f"{media}#{k}", "media_id": media, "scene_index": k, "kind": modality,
                         "domain": domain, "caption": f"The image shows {domain} number {k}."
                         + (" На изображении еда." if domain == "food" else ""), "in_v1": True, "in_v2": True,
                         "sample_prob": 1.0})
    df = pd.DataFrame(rows)
    df["sample_prob"] /= df["sample_prob"].sum()
    df.to_parquet(path)
    return path


def test_production_image_settings_are_valid_config():
    cfg = SftModelsConfig(**PRODUCTION_SFT["sft_models"])
    assert (cfg.batch, cfg.lr, cfg.demo) == (64, 1e-5, False)
    assert PRODUCTION_SFT["sft_partitions"]["family"] == PRODUCTION_SFT["sft_soup"]["family"] == "image_lite"


@pytest.mark.slow
def test_image_subdomains_finetunes_and_hierarchical_soup(tmp_path, monkeypatch, tiny_t2v_dir, tiny_t2i_dir):
    monkeypatch.setenv("K5_HOME", str(tmp_path / "k5"))
    instance = dg.DagsterInstance.ephemeral()
    paths = K5Paths.from_env().ensure()
    record_training_upstream(instance, paths.object_store, tiny_t2v_dir, tiny_t2i_dir)
    instance.report_runless_asset_event(dg.AssetMaterialization("sft_mix", metadata={
        "path": str(_image_mix(tmp_path / "mix.parquet"))}))
    # start from a released image checkpoint: the image bundle's transformer stands in for image_lite_lr's export
    instance.report_runless_asset_event(dg.AssetMaterialization(f"train_{START}", metadata={
        "transformer_dir": str(tiny_t2i_dir / "transformer")}))

    config = {"sft_partitions": {"config": {"family": "image_lite", "kinds": ["image"], "min_items": 1,
                                            "max_partitions": None, "max_new_tokens": 4}}}
    part = dg.materialize([sft_partitions], resources=RESOURCES, instance=instance, run_config={"ops": config})
    meta = {k: v.value for k, v in part.asset_materializations_for_node("sft_partitions")[0].metadata.items()}
    k = meta["subdomains"]["animals"]["k"]
    assert 2 <= k <= 5 and meta["subdomains"]["animals"]["silhouettes"]  # 2..min(9, n-1) tried, best kept
    assert meta["subdomains"]["food"]["k"] == 1  # 2 items: too few to split
    keys = sorted(instance.get_dynamic_partitions(SFT_PARTITIONS.name))
    assert keys == sorted([f"image_lite.animals.s{i}" for i in range(k)] + ["image_lite.food.s0"])
    items = pd.read_parquet(meta["items_path"])
    assert set(items.columns) >= {"domain", "subdomain", "partition", "split"}
    assert items.groupby("domain")["subdomain"].nunique().to_dict() == {"animals": k, "food": 1}
    assert meta["variant_sources"]["ru/extractive"] > 0  # the food captions' Russian sentence

    # two fine-tunes (two animal subdomains; food's fine-tune would only add time), production image batch and lr,
    # one round each
    trained = [f"image_lite.animals.s{i}" for i in range(2)]
    models_config = {"ops": {"sft_models": {"config": {
        "start_stage": START, "batch": PRODUCTION_SFT["sft_models"]["batch"], "lr": PRODUCTION_SFT["sft_models"]["lr"],
        "steps_per_round": 1, "max_rounds": 1, "samples": False}}}}
    metas = {}
    client = MlflowClient(MLflowResource().resolved_tracking_uri())
    for key in trained:
        result = dg.materialize([sft_models], resources=RESOURCES, instance=instance, partition_key=key,
                                run_config=models_config, selection=[sft_models])
        assert result.success
        metas[key] = {k: v.value for k, v in result.asset_materializations_for_node("sft_models")[0].metadata.items()}
        params = client.get_run(metas[key]["mlflow_run_id"]).data.params
        assert (params["job.batch"], params["job.lr"], params["job.stage"]) == ("64", "1e-05", START)
        assert json.loads(Path(metas[key]["pipeline_dir"], "model_index.json").read_text())
        assert Path(metas[key]["pipeline_dir"], "vae").resolve() == (tiny_t2i_dir / "vae").resolve()

    soup = dg.materialize([sft_soup], resources=RESOURCES, instance=instance,
                          run_config={"ops": {"sft_soup": {"config": {"family": "image_lite"}}}})
    meta = {k: v.value for k, v in soup.asset_materializations_for_node("sft_soup")[0].metadata.items()}
    sizes = {key: metas[key]["size"] for key in trained}
    roots = [math.sqrt(sizes[f"image_lite.animals.s{i}"]) for i in range(2)]
    # inside a domain by sqrt size; the domains (here only animals has fine-tunes) equal: see test_sft_soup for both
    expect = {f"image_lite.animals.s{i}": roots[i] / sum(roots) for i in range(2)}
    assert meta["weights"] == pytest.approx(expect)
    recorded = read_soup_metadata(meta["transformer_dir"])
    assert [m["weight"] for m in recorded["members"]] == pytest.approx([expect[key] for key in trained])
    assert Path(meta["pipeline_dir"], "vae").resolve() == (tiny_t2i_dir / "vae").resolve()
    assert set(meta["member_val_loss"]) == set(trained) and math.isfinite(meta["soup_val_loss"])
    assert meta["weighted_members_val_loss"] == pytest.approx(
        sum(expect[key] * loss for key, loss in meta["member_val_loss"].items()))


def test_one_item_partition_counts_its_item_once_and_says_it_validates_on_it():
    from k5data.sft.dataset import SftPartitionConfig, plan_partitions

    rows = [{"media_id": f"m{i}", "scene_index": 0, "kind": "image", "domain": "animals" if i < 4 else "food",
             "sample_prob": 1.0} for i in range(5)]
    parts = {p.key: p for p in plan_partitions(rows, SftPartitionConfig(family="video_lite", min_items=1))[0]}
    food, animals = parts["video_lite.food"], parts["video_lite.animals"]
    assert (food.size, food.val_held_out, food.val_ids == food.train_ids) == (1, False, True)
    assert (animals.size, animals.val_held_out, len(animals.val_ids)) == (4, True, 1)

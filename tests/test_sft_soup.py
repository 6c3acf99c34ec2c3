"""The SFT soup's pieces (report §6.4): recipes built from the fine-tunes' records (video uniform over domains; image
subdomains by sqrt size inside a domain, then the domains), the exported soup equal to the weighted mean and scored
on the union of the validation items, the stop rule and the artifact proxy deciding both ways, and the SFT models in
the SBS registry and the release gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lineage_fixtures import write_test_shards

from evaluation.model_card import ReleaseLineage
from evaluation.sbs.comparisons import COMPARISONS, LineageModel, resolve_model
from k5data.sft.validation import EarlyStop, artifact_score, human_verdict, validation_loss
from k5model.checkpoint import read_state_dict, save_transformer_folder
from k5model.config import get_preset
from k5model.crossdit import CrossDiT
from k5model.synthetic import randomize
from orchestration.sft_runs import make_soup, soup_recipe


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _member(key: str, size: int, sub: str = "") -> dict:
    domain = key.split(".")[1]
    return {"partition": key, "domain": domain, "subdomain": sub, "size": size, "transformer_dir": f"/m/{key}",
            "weights_kind": "ema", "pipeline_dir": f"/p/{key}"}


def test_video_recipe_uniform_and_image_recipe_hierarchical():
    video = soup_recipe([_member("video_lite.people", 30), _member("video_lite.food", 10)], False, "equal")
    assert video.leaf_weights() == [0.5, 0.5]
    image = soup_recipe([_member("image_lite.people.s0", 9, "s0"), _member("image_lite.people.s1", 1, "s1"),
                         _member("image_lite.food.s0", 5, "s0")], True, "equal")
    # people: 1/2 x (3/4, 1/4) by sqrt size; food: 1/2
    assert image.leaf_weights() == pytest.approx([0.375, 0.125, 0.5])
    assert soup_recipe([_member("image_lite.people.s0", 9, "s0"), _member("image_lite.food.s0", 1, "s0")], True,
                       "sqrt_size").leaf_weights() == pytest.approx([0.75, 0.25])
    assert {i.weights_kind for i in image.ingredients} == {"ema"}


def _tiny_members(tmp_path: Path, n: int) -> list[Path]:
    cfg = get_preset("tiny")
    out = []
    for k in range(n):
        torch.manual_seed(k)
        model = randomize(CrossDiT(cfg), seed=k)
        out.append(save_transformer_folder(model, tmp_path / f"m{k}" / "transformer"))
    return out


def test_soup_is_the_weighted_mean_and_is_scored_on_the_union(tmp_path, tiny_t2v_dir):
    store = write_test_shards(tmp_path / "objects", per_shape=1)
    folders = _tiny_members(tmp_path, 3)
    members = [{**_member(f"image_lite.{d}.s{s}", size, f"s{s}"), "transformer_dir": str(f),
                "pipeline_dir": str(f.parent), "val_prefix": "latents"}
               for f, (d, s, size) in zip(folders, [("people", 0, 4), ("people", 1, 1), ("food", 0, 3)])]
    result = make_soup(members, hierarchical=True, domain_scheme="equal", out=tmp_path / "soup",
                       base_pipeline=str(tiny_t2v_dir), store=store)
    weights = [0.5 * 2 / 3, 0.5 * 1 / 3, 0.5]
    assert list(result["weights"].values()) == pytest.approx(weights)
    states = [read_state_dict(f) for f in folders]
    merged = read_state_dict(tmp_path / "soup" / "transformer")
    for key, value in merged.items():
        expect = sum(w * s[key].float() for w, s in zip(weights, states))
        torch.testing.assert_close(value.float(), expect.to(value.dtype).float(), rtol=0, atol=1e-6)
    assert (tmp_path / "soup" / "pipeline" / "model_index.json").is_file()
    losses = result["member_val_loss"]
    assert result["members_mean_val_loss"] == pytest.approx(sum(losses.values()) / 3)
    assert result["best_single_domain"] == min(losses, key=losses.get)
    assert math.isfinite(result["soup_val_loss"])
    again = validation_loss(folders[0], tiny_t2v_dir, store, ["latents"])
    assert again == pytest.approx(losses["image_lite.people.s0"], abs=1e-6)  # fixed seeds and timesteps
    assert validation_loss(folders[1], tiny_t2v_dir, store, ["latents"]) != pytest.approx(again)


def test_early_stop_decides_both_ways():
    stop = EarlyStop(patience=1)
    assert stop.update(1, 2.0, 0.1, 0.1) is None
    assert stop.update(2, 1.5, 0.1, 0.1) is None  # improving
    assert "not improved" in stop.update(3, 1.6, 0.1, 0.1)
    assert stop.best()["step"] == 2
    art = EarlyStop(artifact_tolerance=1.5)
    assert "artifact score" in art.update(1, 1.0, 0.4, 0.2)  # loss fine, samples broke
    human = EarlyStop()
    assert human.update(1, 2.0, None, None, "ok") is None
    assert human.update(2, 1.0, None, None, "artifacts") == "human check found artifacts"
    assert human.best()["step"] == 1  # the flagged step is never the best


def test_artifact_score_and_human_verdict(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.tile(np.linspace(60, 190, 64, dtype=np.float32)[None, :, None], (64, 1, 3)).astype(np.uint8)
    noisy = rng.choice([0, 255], size=(64, 64, 3)).astype(np.uint8)
    assert artifact_score(smooth) < 0.01 < 0.5 < artifact_score(noisy)
    path = tmp_path / "verdicts.json"
    assert human_verdict(path, 4) is None
    path.write_text(json.dumps({"4": "artifacts", "6": "maybe"}))
    assert human_verdict(path, 4) == "artifacts" and human_verdict(path, 2) is None
    with pytest.raises(ValueError, match="write 'ok' or 'artifacts'"):
        human_verdict(path, 6)


def test_sft_models_in_the_sbs_registry_and_the_gate(tmp_path):
    for key, ref in (("soup_vs_pretrain", "pretrain"), ("soup_vs_best_single_domain", "best_single_domain")):
        c = COMPARISONS[key]
        assert str(c.model_a) == "sft:soup" and str(c.model_b) == f"sft:{ref}" and c.can_run()
        assert c.model_a.asset_key == "sft_soup"
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "model_index.json").write_text("{}")
    where = {"soup": tmp_path / "soup", "pretrain": tmp_path / "missing"}
    assert resolve_model(LineageModel.parse("sft:soup"), lambda s: Path(), where.__getitem__) == tmp_path / "soup"
    with pytest.raises(FileNotFoundError, match="materialize sft_soup first"):
        resolve_model(LineageModel.parse("sft:pretrain"), lambda s: Path(), where.__getitem__)
    with pytest.raises(ValueError, match="not one of"):
        LineageModel.parse("sft:best")
    soup = ReleaseLineage(family="video_lite", stage="sft_soup", stages=("video_lite_t2i_lr", "sft_soup"))
    assert soup.lineage_name == "sft:soup"
    assert ReleaseLineage(family="video_lite", stage="video_lite_lr", stages=()).lineage_name == "stage:video_lite_lr"

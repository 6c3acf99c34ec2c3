"""Editing-pair mining (report §4.3, Table 1).

Two levels, because the tests' tiny models have random weights and their similarities mean nothing:
* the Table 1 decision is a pure function (``k5data.editing.rules.decide``), tested rule by rule with given scores,
  each rule keeping one pair and dropping another (with its reason);
* end to end, the derived demo-corpus pairs (object pasted in, recoloured region, plain crop, near-duplicate,
  unrelated photos) go through the real pipeline: offline thumbnail embeddings, SIFT + RANSAC geometry (real
  inliers), the rules, Parquet - through the Dagster assets in-process and through ``k5 edit-pairs``.
The model backends (CLIP, DINOv2, a ViT face embedder from ``from_pretrained`` folders, kornia LoFTR, the Qwen2.5-VL
instruction writer) are run on the same code path with tiny random weights, checked for shape, not meaning.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from k5data.curation.config import load_config
from k5data.curation.corpus import editing_cases, skimage_dir, sklearn_dir
from k5data.curation.filters.quality import aesthetic, technical
from k5data.curation.output import COLUMNS, write_outputs
from k5data.editing.config import EditMiningConfig, RuleThresholds
from k5data.editing.index import nearest_neighbours
from k5data.editing.pairs import PAIR_COLUMNS, cluster_thresholds, read_edit_pairs, sft_subset
from k5data.editing.rules import PairScores, adaptive_ok, decide
from k5data.object_store import open_store

R = RuleThresholds()
BASE = PairScores(clip_sim=0.5, dino_sim=0.5, face_sim=0.0, aligned_dino_sim=0.5, inliers=0, overlap=0.5,
                  clip_thr=0.8)


@pytest.mark.parametrize("kept_scores, dropped_scores, rule, reason", [
    (dict(dino_sim=0.85, inliers=301), dict(dino_sim=0.85, inliers=300), "dino_inliers", "no_rule"),
    (dict(dino_sim=0.85, inliers=301), dict(dino_sim=0.8, inliers=900), "dino_inliers", "no_rule"),
    (dict(clip_sim=0.9, inliers=201), dict(clip_sim=0.9, inliers=200), "clip_inliers", "no_rule"),
    (dict(clip_sim=0.9, inliers=201), dict(clip_sim=0.8, inliers=900, clip_thr=0.5), "clip_inliers", "no_rule"),
    # adaptive: (1 - 0.15) * 0.88 + 0.15 = 0.898
    (dict(clip_sim=0.9, inliers=250, clip_thr=0.88), dict(clip_sim=0.89, inliers=250, clip_thr=0.88),
     "clip_inliers", "no_rule"),
    (dict(face_sim=0.71), dict(face_sim=0.7), "face", "no_rule"),
    # exclusions: the same strong pair, kept just under each exclusion threshold and dropped just over it
    (dict(dino_sim=0.97, inliers=900), dict(dino_sim=0.971, inliers=900), "dino_inliers", "near_duplicate"),
    (dict(dino_sim=0.9, inliers=900, overlap=0.95), dict(dino_sim=0.9, inliers=900, overlap=0.96), "dino_inliers",
     "simple_crop"),
    (dict(dino_sim=0.9, inliers=900, aligned_dino_sim=0.97), dict(dino_sim=0.9, inliers=900, aligned_dino_sim=0.98),
     "dino_inliers", "aligned_near_duplicate"),
    (dict(dino_sim=0.9, inliers=900, face_sim=0.5), dict(dino_sim=0.9, inliers=900, face_sim=0.49), "dino_inliers",
     "face_mismatch"),
    (dict(dino_sim=0.9, inliers=900, face_sim=0.0), dict(dino_sim=0.9, inliers=900, face_sim=0.01), "dino_inliers",
     "face_mismatch"),
])
def test_each_table1_rule_keeps_one_pair_and_drops_another(kept_scores: dict, dropped_scores: dict, rule: str,
                                                            reason: str) -> None:
    kept, dropped = decide(replace(BASE, **kept_scores), R), decide(replace(BASE, **dropped_scores), R)
    assert (kept.kept, kept.rule, kept.drop_reason) == (True, rule, None)
    assert (dropped.kept, dropped.rule, dropped.drop_reason) == (False, None, reason)


def _face_photo(gray: np.ndarray) -> np.ndarray:
    """A 25x25 LFW face (scikit-image's shipped subset) as a 480x480 RGB photo the cascade finds one face in."""
    import cv2

    big = cv2.resize((gray * 255).astype(np.uint8), (240, 240), interpolation=cv2.INTER_CUBIC)
    canvas = np.full((480, 480), 128, np.uint8)
    canvas[120:360, 120:360] = big
    return cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB)


def test_thumbnail_face_similarity_does_not_tell_people_apart() -> None:
    """Why the face rules are off for the thumbnail backend: HOG of the face crop scores other people's faces (real
    LFW faces) as high as the astronaut's own edits (her face pasted into another photo, mirrored, rotated and
    zoomed), and several different people clear Table 1's 0.7 "same person" threshold."""
    import cv2
    from skimage.data import lfw_subset

    from k5data.editing.embeddings import FaceEmbedder, face_similarity

    faces = FaceEmbedder("thumbnail", None)
    astronaut = np.asarray(Image.open(skimage_dir() / "astronaut.png").convert("RGB"))
    china = np.asarray(Image.open(sklearn_dir() / "china.jpg").convert("RGB")).copy()
    r, c, h, w = faces.faces(astronaut)[0]
    pasted = astronaut[r - 40:r + h + 40, c - 40:c + w + 40]
    china[50:50 + pasted.shape[0], 300:300 + pasted.shape[1]] = pasted  # her face in another photo
    turn = cv2.getRotationMatrix2D((256, 256), 8, 1.15)
    rotated = cv2.warpAffine(astronaut, turn, (512, 512), borderMode=cv2.BORDER_REFLECT)
    own = faces.embed(astronaut)
    same = [face_similarity(own, faces.embed(im)) for im in (china, astronaut[:, ::-1].copy(), rotated)]
    others = [face_similarity(own, e) for e in (faces.embed(_face_photo(f)) for f in lfw_subset()[:100])
              if e is not None]
    assert len(others) >= 60 and min(same) > 0.7  # her edits clear the threshold ...
    assert max(others) > min(same) and sum(o > 0.7 for o in others) >= 5  # ... and so do other people


def test_face_rules_decide_only_with_an_identity_capable_backend() -> None:
    """The same measured pair: face_sim 0.76 between two different people. With the thumbnail backend the rules
    read "no faces" (no_rule); with face_backend "hf" (or face_rules on) the face rule keeps it, and a low face_sim
    drops it as face_mismatch."""
    from k5data.editing.pairs import rule_scores

    row = {"clip_sim": 0.5, "dino_sim": 0.5, "face_sim": 0.76, "clip_thr": 0.5}
    thumbnail, hf = EditMiningConfig(), EditMiningConfig(face_backend="hf", face_model_path="face")
    assert not thumbnail.applies_face_rules and hf.applies_face_rules
    assert EditMiningConfig(face_rules=True).applies_face_rules and not replace(hf, face_rules=False).applies_face_rules
    assert decide(rule_scores(row, 0.0, 0, 0.0, thumbnail), thumbnail.rules) == decide(
        replace(BASE, face_sim=0.0), thumbnail.rules)
    assert decide(rule_scores(row, 0.0, 0, 0.0, thumbnail), thumbnail.rules).drop_reason == "no_rule"
    assert decide(rule_scores(row, 0.0, 0, 0.0, hf), hf.rules).rule == "face"
    low = {**row, "face_sim": 0.3}
    assert decide(rule_scores(low, 0.0, 0, 0.0, hf), hf.rules).drop_reason == "face_mismatch"
    assert decide(rule_scores(low, 0.0, 0, 0.0, thumbnail), thumbnail.rules).drop_reason == "no_rule"


def test_adaptive_condition_and_cluster_thresholds() -> None:
    assert adaptive_ok(0.93, 0.9, 0.15) and not adaptive_ok(0.91, 0.9, 0.15)  # bar: 0.915
    clusters = np.array([0, 0, 1])
    neighbours = np.array([[1, 2], [0, -1], [0, 1]])
    sims = np.array([[0.9, 0.5], [0.9, 0.0], [0.6, 0.7]], np.float32)
    thr = cluster_thresholds(clusters, neighbours, sims, 0.5)
    assert thr == pytest.approx({0: 0.9, 1: 0.65})  # cluster 0: median of (0.9, 0.5, 0.9); -1 ignored


def test_sft_subset_on_the_qalign_scale() -> None:
    cfg = EditMiningConfig()
    assert sft_subset(0.8, 0.3, cfg)  # Q-Align 4.2 > 4, aesthetic 2.2 > 2
    assert not sft_subset(0.75, 0.9, cfg) and not sft_subset(0.9, 0.25, cfg) and not sft_subset(None, 0.9, cfg)


def test_mined_rows_are_passed_images_or_rejected_only_as_duplicates() -> None:
    from k5data.editing.pairs import mining_rows

    df = pd.DataFrame({"media_id": list("abcdef"), "kind": ["image"] * 5 + ["video"],
                       "bucket": [256, 256, 256, 0, 512, 256], "passed": [True, False, False, False, False, True],
                       "reject_reason": [None, "duplicate", "duplicate;watermark", "duplicate", "watermark", None]})
    assert mining_rows(df, EditMiningConfig())["media_id"].tolist() == ["a", "b"]  # d: under 256 px, f: video
    assert mining_rows(df, EditMiningConfig(include_rejected=()))["media_id"].tolist() == ["a"]


def test_candidate_search_goes_through_the_index_with_subquadratic_work() -> None:
    rng = np.random.default_rng(0)

    def corpus(n: int) -> np.ndarray:
        centres = rng.normal(size=(60, 64))
        x = centres[rng.integers(0, 60, n)] + 0.3 * rng.normal(size=(n, 64))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    small, large = corpus(750), corpus(3000)
    res_small, res = nearest_neighbours(small, 8), nearest_neighbours(large, 8)
    n = len(large)
    assert res.distance_evaluations < n * (n - 1) / 2 / 5  # all pairs would be 4.5 M
    # 4x the images: quadratic work would grow 16x; the index grows by far less
    assert res.distance_evaluations < 8 * res_small.distance_evaluations
    exact = large @ large.T
    np.fill_diagonal(exact, -2)
    assert (res.neighbours[:, 0] == exact.argmax(1)).mean() > 0.98  # and still finds the true nearest neighbour


# ---- end to end on the derived demo-corpus pairs ----------------------------------------------------------------

NAMES = ["coffee.png", "edit_coffee_pasted.png", "rocket.jpg", "edit_rocket_recoloured.png", "astronaut.png",
         "edit_astronaut_crop.png", "chelsea.png", "edit_chelsea_neardup.jpg", "flower.jpg"]


@functools.cache
def _edits() -> dict[str, Image.Image]:
    return editing_cases(skimage_dir(), sklearn_dir())


def write_curated(root: Path, names: list[str], tag: str) -> Path:
    """A curated dataset (the real writer) over real photos and their derived edits, with their real heuristic
    quality scores; the edits are pHash near-duplicates, so curation would mark them 'duplicate' as here."""
    media = root / "media"
    media.mkdir(exist_ok=True)
    edits = _edits()
    rows = []
    for i, name in enumerate(names):
        path = media / name
        if not path.exists():
            src = skimage_dir() / name if (skimage_dir() / name).exists() else sklearn_dir() / name
            (edits[name] if name in edits else Image.open(src).convert("RGB")).save(path)
        rgb = np.asarray(Image.open(path).convert("RGB"))
        row = dict.fromkeys(COLUMNS)
        row.update(media_id=f"m{i:02d}-{name}", source_uri=str(path), source="corpus", kind="image", scene_index=0,
                   width=rgb.shape[1], height=rgb.shape[0], size=path.stat().st_size, bucket=256, cluster=i // 2,
                   caption=f"A photo ({name}).", quality_technical=technical(rgb), quality_aesthetic=aesthetic(rgb),
                   passed=not name.startswith("edit_"), reject_reason="duplicate" if name.startswith("edit_") else None)
        rows.append(row)
    out = root / f"curated{tag}"
    write_outputs(rows, [], str(out), load_config())
    return out


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import assets.editing as editing
    from orchestration.resources import CurationResource, ObjectStoreResource

    root = tmp_path_factory.mktemp("edit_mining")
    curated = write_curated(root, NAMES, "")
    objects = root / "objects"
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("curated_dataset", metadata={"path": str(curated)}))
        result = dg.materialize([editing.edit_candidates, editing.edit_pairs], instance=instance,
                                resources={"curation": CurationResource(),
                                           "object_store": ObjectStoreResource(base_uri=str(objects))})
        assert result.success
        meta = {k: {m: v.value for m, v in result.asset_materializations_for_node(k)[0].metadata.items()}
                for k in ("edit_candidates", "edit_pairs")}
    pairs = read_edit_pairs(open_store(str(objects)), meta["edit_pairs"]["path"])
    pairs["names"] = [frozenset(Path(u).name for u in p) for p in zip(pairs["source_uri"], pairs["target_uri"])]
    return {"root": root, "meta": meta, "pairs": pairs, "objects": objects}


def _pair(mined: dict, a: str, b: str) -> pd.Series:
    found = mined["pairs"][mined["pairs"]["names"] == frozenset({a, b})]
    assert len(found) == 1, f"{a} / {b} is not a candidate pair"
    return found.iloc[0]


@pytest.mark.slow  # shares the ~40 s mining fixture
def test_assets_write_every_score_and_the_drop_reasons(mined: dict) -> None:
    cand, pairs = mined["meta"]["edit_candidates"], mined["meta"]["edit_pairs"]
    assert cand["images"] == len(NAMES) and 0 < cand["candidates"] < cand["all_pairs"]
    assert cand["embedders"].startswith("thumbnail-colour-hog-v1+thumbnail-lab-v1")
    assert pairs["pairs"] == cand["candidates"] == len(mined["pairs"])
    assert sum(pairs["drop_histogram"].values()) == pairs["dropped"] and pairs["kept"] + pairs["dropped"] == len(
        mined["pairs"])
    assert "| near_duplicate |" in pairs["drop_reasons"] and pairs["matcher"] == "opencv-sift"
    df = mined["pairs"]
    assert set(PAIR_COLUMNS) <= set(df.columns)
    assert (df["kept"] == df["drop_reason"].isna()).all() and (df["kept"] == df["rule"].notna()).all()
    assert (df.loc[df["kept"], "instruction"].str.len() > 10).all() and (df.loc[~df["kept"], "instruction"] == "").all()


@pytest.mark.slow  # shares the ~40 s mining fixture
def test_derived_edits_are_kept_by_their_rules_with_real_inliers(mined: dict) -> None:
    pasted = _pair(mined, "coffee.png", "edit_coffee_pasted.png")
    assert pasted["kept"] and pasted["rule"] == "dino_inliers" and pasted["inliers"] > 300
    assert pasted["instruction"].startswith("Change the bottom left of the image")  # where the cat was pasted
    recoloured = _pair(mined, "rocket.jpg", "edit_rocket_recoloured.png")
    assert recoloured["kept"] and recoloured["rule"] == "clip_inliers" and recoloured["inliers"] > 200
    assert recoloured["adaptive_ok"] and recoloured["dino_sim"] < 0.97


@pytest.mark.slow  # shares the ~40 s mining fixture
def test_crop_near_duplicate_and_unrelated_pairs_are_dropped_with_reasons(mined: dict) -> None:
    crop = _pair(mined, "astronaut.png", "edit_astronaut_crop.png")
    assert not crop["kept"] and crop["drop_reason"] == "simple_crop" and crop["overlap"] > 0.95
    assert crop["inliers"] > 300  # geometry alone would have kept it
    near = _pair(mined, "chelsea.png", "edit_chelsea_neardup.jpg")
    assert not near["kept"] and near["drop_reason"] == "near_duplicate" and near["dino_sim"] > 0.97
    unrelated = mined["pairs"][mined["pairs"]["names"].map(lambda n: "flower.jpg" in n)]
    assert (unrelated["drop_reason"] == "no_rule").all()


@pytest.mark.slow  # shares the ~40 s mining fixture
def test_k5_edit_pairs_runs_the_same_code(mined: dict) -> None:
    from k5cli.main import main

    curated = write_curated(mined["root"], ["chelsea.png", "edit_chelsea_neardup.jpg"], "_cli")
    out = mined["root"] / "cli_out"
    result = CliRunner().invoke(main, ["edit-pairs", str(curated), str(out)])
    assert result.exit_code == 0, result.output
    pairs = read_edit_pairs(open_store(str(out)))
    assert len(pairs) == 1 and pairs["drop_reason"].tolist() == ["near_duplicate"]
    bad = CliRunner().invoke(main, ["edit-pairs", str(mined["root"] / "nowhere"), str(out)])
    assert bad.exit_code != 0 and "Error" in bad.output


# ---- model backends: tiny random weights through the production loading path ------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from k5data.curation import random_models

    root = tmp_path_factory.mktemp("edit_models")
    random_models.dinov2(root / "dinov2")
    torch.manual_seed(0)
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                 patch_size=8)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**small, projection_dim=16)).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    ViTModel(ViTConfig(**small)).save_pretrained(root / "face")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "face")
    return {k: root / k for k in ("clip", "dinov2", "face")}


def test_model_backends_load_from_local_folders(tiny_models: dict[str, Path],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    from k5data.editing.pairs import find_candidates

    root = tmp_path_factory.mktemp("edit_models_run")
    curated = write_curated(root, ["astronaut.png", "edit_astronaut_crop.png"], "")
    from k5data.curation.output import read_dataset

    cfg = EditMiningConfig(clip_backend="clip", clip_model_path=str(tiny_models["clip"]), dino_backend="dinov2",
                           dino_model_path=str(tiny_models["dinov2"]), face_backend="hf",
                           face_model_path=str(tiny_models["face"]), min_candidate_sim=-1.0)
    candidates, summary = find_candidates(read_dataset(str(curated), load_config()), cfg)
    assert summary["embedders"] == "clip:clip+dinov2+lbp-cascade+face:face"
    assert len(candidates) == 1 and candidates[["clip_sim", "dino_sim"]].abs().le(1.0 + 1e-5).all().all()
    assert summary["faces"] == 2  # the astronaut's face is found by the cascade in both
    assert -1.0 <= candidates["face_sim"].iloc[0] <= 1.0 and candidates["face_sim"].iloc[0] != 0.0
    with pytest.raises(FileNotFoundError, match="configure a local model path"):
        find_candidates(read_dataset(str(curated), load_config()), replace(cfg, dino_model_path=str(root / "none")))


def test_loftr_matcher_and_vlm_instructions_run_on_random_weights(tmp_path_factory: pytest.TempPathFactory) -> None:
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from k5data.editing.geometry import make_matcher, verify
    from k5data.editing.instructions import InstructionWriter
    from k5model.tiny import _qwen_model, _qwen_tokenizer

    rgb = np.asarray(Image.open(skimage_dir() / "astronaut.png").convert("RGB"))
    geo = verify(rgb, rgb[32:480, 32:480], make_matcher("loftr"), match_side=96)
    assert geo.matches >= 0 and geo.inliers == sum(geo.groups)
    vlm = tmp_path_factory.mktemp("edit_vlm")
    torch.manual_seed(0)
    tok = _qwen_tokenizer()
    tok.save_pretrained(vlm)
    _qwen_model(tok).save_pretrained(vlm)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(vlm)
    writer = InstructionWriter("qwen2_5_vl", str(vlm), max_new_tokens=4)
    text = writer.write(rgb, rgb[::-1], None, "ignored by the VLM")
    assert isinstance(text, str) and writer.vlm.last_new_tokens > 0
    with pytest.raises(ValueError, match="instruction_model_path"):
        InstructionWriter("qwen2_5_vl", None)

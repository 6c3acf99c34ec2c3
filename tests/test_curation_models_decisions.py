"""Every model-backed curation filter decides BOTH ways through its production code path: tiny random-weight
models of the production classes (``k5data.curation.random_models``: ViT classifier, YOLOS detector, VideoMAE
regressor, SAM 2, CLIP, Qwen2.5-VL) are saved with ``save_pretrained`` and loaded by the backends with
``from_pretrained`` from the temp folder, exactly as the production config loads real checkpoints.

Random weights carry no meaning, so each decision's threshold is calibrated in the test config on the tiny model's
own scores for the pair (real sample, derived hard case): midway between them. A random model may rank the pair the
wrong way round; ``_seeded`` then tries the next weight seed (documented in docs/curation.md). What the test shows is
that the filter's code path (frame sampling, batching, averaging, the either-fires rule, the reason) decides both
ways through the model; with real checkpoints the thresholds are the production config's."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_curation_models import tiny_vlm  # noqa: F401  (module-scoped fixture: the tiny Qwen2.5-VL folder)
from test_filter_decisions import (
    _clip,
    _decides,
    _draw_text,
    _image,
    _jpeg,
    _photo,
    carphone,  # noqa: F401  (module-scoped fixture: the clip at 2 FPS)
)

from k5data.curation import random_models as rm
from k5data.curation.backends import (
    ClipZeroShot,
    HFImageClassifier,
    HFObjectDetector,
    HFVideoRegressor,
    Sam2Counter,
)
from k5data.curation.classes import classify
from k5data.curation.config import PRODUCTION_CONFIG, load_config
from k5data.curation.filters.complexity import score_complexity
from k5data.curation.filters.motion import score_motion
from k5data.curation.filters.quality import score_quality
from k5data.curation.filters.text_area import score_text_area
from k5data.curation.filters.watermark import score_watermark

CFG = load_config()


def _cfg(name: str, **over: object) -> dict:
    out = copy.deepcopy(CFG.section(f"filters.{name}"))
    out.update(over)
    return out


def _mid(a: float, b: float) -> float:
    assert a != b, "the tiny model scores the pair identically; nothing to calibrate"
    return (a + b) / 2


def _seeded(build: Callable[[int], object], ordered: Callable[[object], bool], tries: int = 12) -> object:
    """The first seed whose random model ranks the real sample above the hard case (see module docstring)."""
    for seed in range(tries):
        model = build(seed)
        if ordered(model):
            return model
    raise AssertionError(f"no seed in {tries} ranks the pair the filter's way")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _photo("astronaut.png")


@pytest.fixture(scope="module")
def logo(astronaut: np.ndarray) -> np.ndarray:
    return _draw_text(astronaut, [("K5 STOCK", 0.72, 0.04)], 1 / 14)  # a channel mark in the top-right corner


def test_watermark_classifier_and_detector_either_fires(tmp_path: Path, astronaut: np.ndarray,
                                                        logo: np.ndarray) -> None:
    real, hard = _image(astronaut), _image(logo)
    clf = _seeded(lambda s: HFImageClassifier(rm.image_classifier(tmp_path / f"c{s}", ["clean", "watermark"], seed=s),
                                              "watermark"),
                  lambda m: m.probability(logo) > m.probability(astronaut))
    det = _seeded(lambda s: HFObjectDetector(rm.object_detector(tmp_path / f"d{s}", ["person", "watermark"], seed=s)),
                  lambda m: m.label_scores([logo], ["watermark"])[0] > m.label_scores([astronaut], ["watermark"])[0])
    p_cls = _mid(clf.probability(astronaut), clf.probability(logo))
    p_det = _mid(*(det.label_scores([x], ["watermark"])[0] for x in (astronaut, logo)))
    both = _cfg("watermark", backend="models", max_prob=p_cls, max_detector_score=p_det)
    row = score_watermark(real, both, clf, det)
    _decides(row, "watermark", True)
    assert row["watermark_backend"] == f"{clf.name}+{det.name}"
    _decides(score_watermark(hard, both, clf, det), "watermark", False, "watermark")
    # either model alone flags the logo: the other one's threshold is out of reach
    only_cls = _cfg("watermark", backend="models", max_prob=p_cls, max_detector_score=1.0)
    only_det = _cfg("watermark", backend="models", max_prob=1.0, max_detector_score=p_det)
    for cfg in (only_cls, only_det):
        _decides(score_watermark(real, cfg, clf, det), "watermark", True)
        row = score_watermark(hard, cfg, clf, det)
        _decides(row, "watermark", False, "watermark")
    assert row["watermark_detector"] > p_det and row["watermark_classifier"] <= 1.0


def test_quality_image_classifiers_reject_a_heavy_reencode(tmp_path: Path, astronaut: np.ndarray) -> None:
    hard = _jpeg(astronaut, 5)
    tech = _seeded(lambda s: HFImageClassifier(rm.image_classifier(tmp_path / f"t{s}", ["bad", "good"], seed=s),
                                               "good"),
                   lambda m: m.probability(astronaut) > m.probability(hard))
    aes = HFImageClassifier(rm.image_classifier(tmp_path / "aes", ["bad", "good"], seed=99), "good")
    floor = min(aes.probability(astronaut), aes.probability(hard)) - 1e-3
    cfg = _cfg("quality", backend="models", min_technical=_mid(tech.probability(astronaut), tech.probability(hard)),
               min_aesthetic=floor)
    models = {"technical": tech, "aesthetic": aes}
    _decides(score_quality(_image(astronaut), cfg, models), "quality", True)
    _decides(score_quality(_image(hard), cfg, models), "quality", False, "low_technical_quality")


def test_quality_qalign_readout_rejects_a_degraded_photo(tmp_path: Path, tiny_vlm: Path,  # noqa: F811
                                                         astronaut: np.ndarray) -> None:
    import cv2

    from k5data.curation.vlm import load_vlm, qalign_scores

    vlm = load_vlm(tiny_vlm)
    real = qalign_scores(vlm, [astronaut])
    assert 1.0 <= real["quality"] <= 5.0 and 1.0 <= real["aesthetic"] <= 5.0
    # the derived degradation the tiny random VLM scores lowest of three (its ranking means nothing by itself)
    hards = [_jpeg(astronaut, 5), cv2.GaussianBlur(astronaut, (0, 0), 3), np.full_like(astronaut, 128)]
    scored = sorted(((qalign_scores(vlm, [h])["quality"], i) for i, h in enumerate(hards)))
    low, i = scored[0]
    assert low < real["quality"], (real, scored)
    tiny_clf = HFImageClassifier(rm.image_classifier(tmp_path / "qa_clf", ["bad", "good"]), "good")
    models = {"technical": tiny_clf, "aesthetic": tiny_clf, "qalign": vlm}
    cfg = _cfg("quality", backend="models", min_technical=0.0, min_aesthetic=0.0,
               qalign={"min_quality": _mid(real["quality"], low), "min_aesthetic": 1.0})
    row = score_quality(_image(astronaut), cfg, models)
    _decides(row, "quality", True)
    assert row["quality_qalign"] == pytest.approx(real["quality"]) and "qalign:" in row["quality_backend"]
    _decides(score_quality(_image(hards[i]), cfg, models), "quality", False, "low_qalign_quality")


def test_quality_video_regressor_rejects_a_blurred_clip(tmp_path: Path,
                                                        carphone: tuple[list[np.ndarray], float]) -> None:  # noqa: F811
    import cv2

    frames, fps = carphone
    blurred = [cv2.GaussianBlur(f, (0, 0), 4) for f in frames]
    video = _seeded(lambda s: HFVideoRegressor(rm.video_regressor(tmp_path / f"v{s}", ["technical", "aesthetic"],
                                                                  seed=s)),
                    lambda m: m.scores(frames)["technical"] > m.scores(blurred)["technical"])
    sig = [1 / (1 + np.exp(-video.scores(x)["technical"])) for x in (frames, blurred)]
    cfg = _cfg("quality", backend="models", min_technical=_mid(*sig), min_aesthetic=0.0)
    models = {"technical": None, "aesthetic": None, "video": video}
    row = score_quality(_clip(frames, fps, 15), cfg, models)
    _decides(row, "quality", True)
    assert row["quality_backend"] == video.name
    _decides(score_quality(_clip(blurred, fps, 15), cfg, models), "quality", False, "low_technical_quality")


def test_text_area_through_a_configured_detector_file(tmp_path: Path, astronaut: np.ndarray) -> None:
    """The model path of text area: rapidocr's own loader on a detector file named in the config (here a copy of
    the one in the wheel: an ONNX detector, not a transformers model, so no random twin is built)."""
    import rapidocr

    det = tmp_path / "det.onnx"
    shutil.copyfile(next((Path(rapidocr.__file__).parent / "models").glob("*det*.onnx")), det)
    cfg = _cfg("text_area", model_path=str(det))
    row = score_text_area(_image(astronaut), cfg)
    _decides(row, "text_area", True)
    assert row["text_area_backend"] == "rapidocr-det:det.onnx"
    words = ["SALE 50% OFF TODAY", "ALL SUMMER ITEMS", "FREE DELIVERY", "VISIT OUR STORE"]
    covered = _draw_text(astronaut, [(w, 0.22, 0.25 + 0.13 * i) for i, w in enumerate(words)], 1 / 12)
    _decides(score_text_area(_image(covered), cfg), "text_area", False, "too_much_text")
    with pytest.raises(FileNotFoundError, match="text_area"):
        score_text_area(_image(astronaut), _cfg("text_area", model_path=str(tmp_path / "missing.onnx")))


def test_complexity_sam2_plus_sobel_rejects_a_flat_image(tmp_path: Path, astronaut: np.ndarray) -> None:
    flat = np.empty_like(astronaut)
    flat[:] = astronaut.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    opts = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_thresh": 0.0, "min_area": 0.0}
    cfg = _cfg("complexity", backend="sam2")

    def score(model: Sam2Counter, rgb: np.ndarray) -> float:
        return score_complexity(_image(rgb), cfg, model)["complexity_score"]

    sam = _seeded(lambda s: Sam2Counter(rm.sam2(tmp_path / f"s{s}", seed=s), **opts),
                  lambda m: score(m, astronaut) > score(m, flat))
    cfg["min_score"] = _mid(score(sam, astronaut), score(sam, flat))
    row = score_complexity(_image(astronaut), cfg, sam)
    _decides(row, "complexity", True)
    assert row["complexity_backend"] == "sobel+sam2" and row["complexity_regions"] == sam.count(astronaut)
    _decides(score_complexity(_image(flat), cfg, sam), "complexity", False, "too_simple")


def test_motion_videomae_rejects_a_still_and_a_flickering_clip(
        tmp_path: Path, carphone: tuple[list[np.ndarray], float]) -> None:  # noqa: F811
    frames, fps = carphone
    still = [frames[0]] * len(frames)
    flicker = [np.clip(f.astype(int) + (90 if i % 2 else -90), 0, 255).astype(np.uint8) for i, f in enumerate(frames)]

    def ordered(m: HFVideoRegressor) -> bool:
        real, st, fl = m.scores(frames), m.scores(still), m.scores(flicker)
        return real["object"] > st["object"] and fl["light"] > real["light"] and fl["object"] > st["object"]

    model = _seeded(lambda s: HFVideoRegressor(rm.video_regressor(tmp_path / f"m{s}", ["camera", "object", "light"],
                                                                  seed=s)), ordered, tries=30)
    real, st, fl = model.scores(frames), model.scores(still), model.scores(flicker)
    cfg = _cfg("motion", backend="videomae", max_camera=None, min_object=_mid(real["object"], st["object"]),
               max_light=_mid(real["light"], fl["light"]))
    row = score_motion(_clip(frames, fps, 15), cfg, model)
    _decides(row, "motion", True)
    assert row["motion_backend"] == model.name and row["light_motion"] == pytest.approx(real["light"])
    _decides(score_motion(_clip(still, fps, 15), cfg, model), "motion", False, "no_object_motion")
    _decides(score_motion(_clip(flicker, fps, 15), cfg, model), "motion", False, "light_change")


def test_object_and_scene_classes_columns(tmp_path: Path, astronaut: np.ndarray) -> None:
    labels = CFG.section("classes.scene")["labels"]
    det = HFObjectDetector(rm.object_detector(tmp_path / "det", ["person", "car", "dog"]))
    clip = ClipZeroShot(rm.clip(tmp_path / "clip"), labels)
    best = max(s for _, s in det.detect([astronaut])[0])
    cfg = {"objects": {"min_score": best - 1e-6, "max_labels": 10}}
    row = classify(_image(astronaut), cfg, det, clip)
    top = det.detect([astronaut], min_score=best - 1e-6)[0]
    assert row["objects"] == f"{top[0][0]}:{len(top)}" and row["objects_backend"] == det.name
    for key, names in labels.items():
        assert row[f"scene_{key}"] in names
    assert row["scene_backend"] == clip.name
    cfg["objects"]["min_score"] = 1.0  # nothing that sure: an empty label list, not an error
    assert classify(_image(astronaut), cfg, det, None)["objects"] == ""
    assert classify(_image(astronaut), cfg)["scene_place"] is None  # backend none: no model, empty columns


def _production_models(root: Path, tiny_vlm: Path) -> None:  # noqa: F811
    """Tiny random models under the folder names of configs/production.yaml."""
    import rapidocr

    rm.image_classifier(root / "watermark-vit-b16", ["clean", "watermark"])
    rm.object_detector(root / "rtdetr-v2-r50-watermark", ["watermark", "logo"])
    rm.image_classifier(root / "iqa-technical-vit-b16", ["bad", "good"])
    rm.image_classifier(root / "iqa-aesthetic-vit-b16", ["bad", "good"], seed=1)
    rm.video_regressor(root / "vqa-videomae-b-dover", ["technical", "aesthetic"])
    rm.video_regressor(root / "videomae-b-dynamics", ["camera", "object", "light"])
    rm.sam2(root / "sam2.1-hiera-large")
    rm.object_detector(root / "rtdetr-v2-r50vd", ["person", "car", "dog"])
    rm.clip(root / "clip-vit-large-patch14")
    shutil.copytree(tiny_vlm, root / "qwen2.5-vl-7b-instruct")
    (root / "ppocr").mkdir()
    shutil.copyfile(next((Path(rapidocr.__file__).parent / "models").glob("*det*.onnx")),
                    root / "ppocr" / "PP-OCRv5_server_det.onnx")


def test_production_config_runs_on_tiny_twins(tmp_path: Path, tiny_vlm: Path,  # noqa: F811
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/production.yaml end to end: every model it names is loaded from $K5_MODELS through the backends
    (here tiny random twins under the same folder names), and the curated Parquet carries the model columns."""
    from k5data.curation.corpus import skimage_dir
    from k5data.curation.curate import run_curation
    from k5data.curation.output import read_dataset, read_quarantine
    from k5data.curation.score import Scorers

    monkeypatch.setenv("K5_MODELS", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="watermark-vit-b16"):
        Scorers(load_config(PRODUCTION_CONFIG, {"device": "cpu"}))  # a missing folder is named; nothing downloads
    models = tmp_path / "models"
    _production_models(models, tiny_vlm)
    monkeypatch.setenv("K5_MODELS", str(models))
    cfg = load_config(PRODUCTION_CONFIG, {"device": "cpu", "captions": {"max_new_tokens": 4},
                                          "filters": {"complexity": {"sam2": {"points_per_side": 4}}}})
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(skimage_dir() / "astronaut.png", src / "astronaut.png")
    summary = run_curation(str(src), str(tmp_path / "out"), cfg, progress=False)
    assert summary.scoring_errors == 0, read_quarantine(str(tmp_path / "out"), cfg).to_dict("records")
    row = read_dataset(str(tmp_path / "out"), cfg).iloc[0]
    assert row["watermark_backend"].startswith("hf-image-classifier:watermark-vit-b16+hf-object-detector:")
    assert "qalign:qwen2_5_vl" in row["quality_backend"] and 1.0 <= row["quality_qalign"] <= 5.0
    assert row["complexity_backend"] == "sobel+sam2" and row["text_area_backend"].startswith("rapidocr-det:")
    assert row["caption_backend"] == "qwen2_5_vl" and row["domain_backend"] == "qwen2_5_vl"
    assert row["objects_backend"].endswith("rtdetr-v2-r50vd") and row["scene_style"] in cfg.section(
        "classes.scene.labels.style")
    assert row["watermark_classifier"] is not None and row["watermark_detector"] is not None

"""Production backends through their real loading path: a tiny random Qwen2.5-VL (captions, domains) and a tiny
random ViT image classifier (watermark), built here, saved to a temp folder and loaded with ``from_pretrained``.
Random weights generate garbage text, so these tests check the plumbing; post-processing is tested on fixed
strings in test_curation_units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from k5data.curation.captions import Captioner
from k5data.curation.domains import CATEGORIES, DomainClassifier
from k5data.curation.filters import Item
from k5data.curation.filters.watermark import score_watermark

_TINY_VLM: dict[str, Path] = {}  # one build per session: other test modules import this fixture


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from k5data.curation.random_models import qwen_vl

    if "path" not in _TINY_VLM:  # the folder lives under the session's basetemp, read-only to the tests
        _TINY_VLM["path"] = qwen_vl(tmp_path_factory.mktemp("tiny_qwen_vl"))
    return _TINY_VLM["path"]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    out = tmp_path_factory.mktemp("tiny_watermark_vit")
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, id2label={0: "clean", 1: "watermark"}, label2id={"clean": 0, "watermark": 1})
    ViTForImageClassification(cfg).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _frame(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((120, 160, 3)) * 255).astype(np.uint8)


def test_qwen_vl_captioner_through_from_pretrained(tiny_vlm: Path) -> None:
    from k5data.curation.vlm import load_vlm

    vlm = load_vlm(tiny_vlm, max_new_tokens=6)
    ids = vlm.prompt_ids("Describe.", 16)
    assert ids.count(vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 16
    captioner = Captioner({"backend": "qwen2_5_vl", "model_path": str(tiny_vlm), "max_new_tokens": 6})
    caption, raw, backend = captioner.caption("image", _frame(), None, 0)
    assert backend == "qwen2_5_vl" and isinstance(raw, str) and isinstance(caption, str)
    assert 1 <= vlm.last_new_tokens <= 6  # generation really ran, with the configured budget
    # A sidecar wins over the model: human / upstream captions are never overwritten.
    assert captioner.caption("image", _frame(), {None: "The image shows a dog."}, 0)[:2] == (
        "A dog.", "The image shows a dog.")


def test_qwen_vl_domain_classifier(tiny_vlm: Path) -> None:
    domains = DomainClassifier({"backend": "qwen2_5_vl", "model_path": str(tiny_vlm)})
    domain, backend = domains.classify("video", _frame(1), caption="")
    assert backend == "qwen2_5_vl" and domain in CATEGORIES


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    captioner = Captioner({"backend": "qwen2_5_vl", "model_path": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="VLM folder"):
        captioner.caption("image", _frame(), None, 0)


def test_watermark_classifier_backend(tiny_classifier: Path) -> None:
    from k5data.curation.backends import HFImageClassifier

    clf = HFImageClassifier(tiny_classifier, "watermark")
    frames = {i: _frame(i) for i in range(5)}
    item = Item("video", 160, 120, frames, fps=25.0, wm=list(range(5)))
    row = score_watermark(item, {"backend": "hf-image-classifier", "max_prob": 0.5}, clf)
    expected = float(np.mean([clf.probability(f) for f in frames.values()]))  # mean over the 5 frames
    assert row["watermark_score"] == pytest.approx(expected) and 0.0 < expected < 1.0
    assert row["watermark_backend"] == f"hf-image-classifier:{tiny_classifier.name}"
    with pytest.raises(ValueError, match="no label"):
        HFImageClassifier(tiny_classifier, "logo")


def test_curate_with_vlm_backends_from_config(tiny_vlm: Path, tmp_path: Path) -> None:
    """The config switches captions and domains to the VLM; a file without a sidecar gets a model caption."""
    import shutil

    from k5data.curation.config import load_config
    from k5data.curation.corpus import skimage_dir
    from k5data.curation.curate import run_curation
    from k5data.curation.output import read_dataset

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(skimage_dir() / "astronaut.png", src / "astronaut.png")
    cfg = load_config(overrides={"captions": {"backend": "qwen2_5_vl", "model_path": str(tiny_vlm),
                                              "max_new_tokens": 4, "require": False},
                                 "domains": {"backend": "qwen2_5_vl", "model_path": str(tiny_vlm)}})
    run_curation(str(src), str(tmp_path / "out"), cfg, progress=False)
    row = read_dataset(str(tmp_path / "out"), cfg).iloc[0]
    assert row["caption_backend"] == "qwen2_5_vl" and row["domain_backend"] == "qwen2_5_vl"
    assert row["domain"] in CATEGORIES

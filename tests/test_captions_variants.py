"""Caption clean-up keeping English and Russian, caption variants from a configured LM (a tiny random LM of the
production class through the same load and generate path), the trainer's per-step variant draw, and subdomains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from k5data.curation.captions import postprocess_caption, split_languages
from k5data.sft.build import items_table
from k5data.sft.dataset import SftPartitionConfig, plan_partitions
from k5data.sft.subdomains import split_domain
from k5data.sft.variants import (
    LENGTHS,
    PRODUCTION_LM_CLASS,
    CaptionRewriter,
    CaptionVariants,
    RewriterConfig,
    extractive,
    parse_answer,
    write_tiny_lm,
)
from k5model.training.caption_variants import VARIANTS_PREFIX, caption_choices, pick_captions


@pytest.mark.parametrize("raw, clean", [
    ("На изображении показан кот на диване. Кот спит.", "Кот на диване. Кот спит."),
    ("The image shows a cat. На фото кот. 猫在沙发上。", "A cat. Кот."),
    ("Text KOT on a sign. Вывеска с надписью CAT.", "Text KOT on a sign."),  # mixed scripts in one sentence: noise
    ("猫在沙发上。", ""),
])
def test_cleanup_keeps_english_and_russian(raw: str, clean: str) -> None:
    assert postprocess_caption(raw) == clean


def test_cleanup_languages_are_configurable() -> None:
    assert postprocess_caption("A cat. Кот.", languages=("en",)) == "A cat."
    assert split_languages("A cat. Кот.") == {"en": "A cat.", "ru": "Кот."}


def test_parse_answer_keeps_each_language_in_its_script() -> None:
    assert parse_answer('Sure!\n```json\n{"en": "The image shows a fox.", "ru": "Лиса в траве."}\n```') == \
        {"en": "A fox.", "ru": "Лиса в траве."}
    assert parse_answer('{"en": "Лиса.", "ru": "A fox."}') == {}  # each text in the wrong script: rejected
    assert parse_answer("no json here {not: json}") == {}


def test_extractive_cut() -> None:
    text = "A red fox sits in tall grass. Its fur glows orange in the evening sun. Birds fly above."
    assert extractive(text, 7) == "A red fox sits in tall grass."
    assert extractive(text, 16) == "A red fox sits in tall grass. Its fur glows orange in the evening sun."
    assert extractive(text, 3) == "A red fox."


@pytest.mark.slow  # ~40 s on a loaded 2-core box (tokenizer training + 10 generations)
def test_tiny_lm_rewrites_through_the_production_path(tmp_path) -> None:
    from k5model.tiny import _qwen_tokenizer

    _qwen_tokenizer().save_pretrained(tmp_path / "tok")
    lm = write_tiny_lm(tmp_path / "lm", tmp_path / "tok")
    assert json.loads((lm / "config.json").read_text())["architectures"] == [PRODUCTION_LM_CLASS]
    rewriter = CaptionRewriter(RewriterConfig(model_path=str(lm), max_new_tokens=4))
    assert rewriter.name.startswith(PRODUCTION_LM_CLASS)
    assert isinstance(rewriter.answer("a fox", "short"), str)  # the LM really generates (noise)
    v = rewriter.variants("The image shows a red fox in tall grass. На изображении рыжая лиса в траве.")
    assert set(v.texts) == {"en", "ru"} and all(set(v.texts[lang]) == set(LENGTHS) for lang in v.texts)
    # a random LM never answers the requested JSON: every variant is the recorded extractive fallback
    assert v.counts() == {"en/lm": 0, "en/extractive": 5, "ru/lm": 0, "ru/extractive": 5}
    assert v.texts["ru"]["medium"] == "Рыжая лиса в траве."
    with pytest.raises(ValueError, match="gave no caption"):
        rewriter.variants("猫在沙发上。")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CaptionRewriter(RewriterConfig(model_path=str(tmp_path / "missing")))


def test_trainer_draws_every_variant_reproducibly() -> None:
    v = CaptionVariants(texts={"en": {n: f"en {n}" for n in LENGTHS}, "ru": {n: f"ru {n}" for n in LENGTHS}})
    caption = v.encode()
    assert caption.startswith(VARIANTS_PREFIX) and len(caption_choices(caption)) == 10
    draws = [pick_captions([caption, "plain"], torch.Generator().manual_seed(s)) for s in range(200)]
    assert {d[0] for d in draws} == set(caption_choices(caption))  # every variant is seen
    assert {d[1] for d in draws} == {"plain"}  # plain captions pass through
    assert draws[7] == pick_captions([caption, "plain"], torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="not JSON"):
        caption_choices(VARIANTS_PREFIX + "{broken")


def test_subdomain_k_by_silhouette_both_ways() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    three = np.concatenate([c + 0.3 * rng.standard_normal((8, 2)) for c in centres])
    split = split_domain(three)
    assert split.k == 3 and len(set(split.labels[:8])) == 1 and split.silhouettes[3] == max(split.silhouettes.values())
    two = np.concatenate([c + 0.3 * rng.standard_normal((8, 2)) for c in centres[:2]])
    assert split_domain(two).k == 2
    tiny = split_domain(three[:2])
    assert tiny.k == 1 and "too few" in tiny.reason


def test_partitions_by_domain_or_subdomain() -> None:
    rows = [{"media_id": f"m{i}", "scene_index": 0, "kind": "image", "domain": "animals" if i < 6 else "food",
             "sample_prob": 1.0} for i in range(8)] + [{"media_id": "v", "scene_index": 0, "kind": "video",
                                                       "domain": "tech", "sample_prob": 1.0}]
    parts, report = plan_partitions(rows, SftPartitionConfig(family="video_lite", min_items=2))
    assert [p.key for p in parts] == ["video_lite.animals", "video_lite.food"] and report["skipped"] == {
        "video_lite.tech": "1 items < min_items 2"}
    assert all(not set(p.train_ids) & set(p.val_ids) for p in parts)
    emb = {f"m{i}-0": np.array([float(i % 2) * 10, 0.0]) + 0.01 * i for i in range(8)}
    parts, report = plan_partitions(rows, SftPartitionConfig(family="image_lite", kinds=("image",), min_items=1),
                                    emb)
    assert report["subdomains"]["animals"]["k"] == 2
    assert {p.key for p in parts} >= {"image_lite.animals.s0", "image_lite.animals.s1"}
    table = items_table(parts)  # domain and subdomain as columns
    assert set(table[table["domain"] == "animals"]["subdomain"]) == {"s0", "s1"} and len(table) == 8
    with pytest.raises(ValueError, match="no embedding"):
        plan_partitions(rows, SftPartitionConfig(family="image_lite", kinds=("image",)), {})

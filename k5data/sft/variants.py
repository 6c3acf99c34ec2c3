"""Caption variants of an SFT item (report §4.6): a configured instruct LM (production: Qwen3-32B) rewrites the VLM's
long description into very long / long / medium / short / very short captions, English and Russian requested
together in one answer for consistency; the answers go through the same regex clean-up as every caption
(``k5data.curation.captions``), which keeps each language's sentences.

The LM is loaded with ``AutoModelForCausalLM.from_pretrained`` from a local folder (``RewriterConfig.model_path``);
tests and the demo build a tiny random LM of the production class (``write_tiny_lm``) and go through the same path.
An answer that is not the requested JSON (a random LM's always is not) leaves that length without LM text; the
variant then falls back to an extractive cut of the description's own sentences in that language (recorded per
variant as ``source``: "lm" or "extractive"), and a language the description does not contain stays absent.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k5data.curation.captions import postprocess_caption, split_languages
from k5model.training.caption_variants import VARIANTS_PREFIX

LENGTHS = ("very_long", "long", "medium", "short", "very_short")
LANGUAGES = ("en", "ru")
# target words per length (the report gives names only; these follow its examples' proportions)
TARGET_WORDS = {"very_long": 120, "long": 70, "medium": 35, "short": 15, "very_short": 6}
PRODUCTION_LM_CLASS = "Qwen3ForCausalLM"  # the report's rewriter, Qwen3-32B

SYSTEM_PROMPT = (
    "You rewrite image and video descriptions into captions a person would write. Keep only what the description "
    "states; no opening phrases such as 'The image shows'. Answer with one JSON object "
    '{"en": "<English caption>", "ru": "<Russian caption>"} and nothing else.')
USER_PROMPT = "Description:\n{description}\n\nWrite a {length} caption of about {words} words in English and Russian."


@dataclass(kw_only=True)
class RewriterConfig:
    """Which LM rewrites the descriptions, and how."""

    model_path: str
    """Local folder of an instruct causal LM and its tokenizer (production: a Qwen3-32B snapshot)."""
    max_new_tokens: int = 384
    """Tokens generated per answer (one answer per length holds both languages)."""
    device: str = "cpu"
    """Torch device of the LM."""
    dtype: str = "float32"
    """Torch dtype of the LM's weights (bfloat16 on GPUs)."""
    system_prompt: str = SYSTEM_PROMPT
    """System message of every request."""


@dataclass
class CaptionVariants:
    """Captions of one item: ``texts[lang][length]`` and where each came from (``sources[lang][length]``)."""

    texts: dict[str, dict[str, str]] = field(default_factory=dict)
    sources: dict[str, dict[str, str]] = field(default_factory=dict)

    def encode(self) -> str:
        """The shard caption field: the trainer draws one variant per step from it."""
        return VARIANTS_PREFIX + json.dumps(self.texts, ensure_ascii=False, sort_keys=True)

    def counts(self) -> dict[str, int]:
        return {f"{lang}/{src}": sum(1 for s in by_len.values() if s == src)
                for lang, by_len in self.sources.items() for src in ("lm", "extractive")}


def parse_answer(answer: str) -> dict[str, str]:
    """{"en": ..., "ru": ...} from an LM answer (the first JSON object in it, code fences and chatter allowed), each
    text cleaned and kept only in the language it claims; {} when there is no such object."""
    for m in re.finditer(r"\{[^{}]*\}", answer, re.DOTALL):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        out = {}
        for lang in LANGUAGES:
            text = obj.get(lang)
            if isinstance(text, str):
                kept = split_languages(text, (lang,)).get(lang)
                if kept:
                    out[lang] = kept
        if out:
            return out
    return {}


def extractive(text: str, words: int) -> str:
    """The leading sentences of ``text`` up to about ``words`` words (at least one sentence, cut at ``words``)."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    out: list[str] = []
    for s in sentences:
        if out and len(" ".join(out + [s]).split()) > words:
            break
        out.append(s)
    cut = " ".join(out).split()
    return " ".join(cut[:words]).rstrip(",;:") + ("" if len(cut) <= words else ".")


class CaptionRewriter:
    """The configured LM and its tokenizer, loaded once."""

    def __init__(self, config: RewriterConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(config.model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"rewriter LM {path} has no config.json; set model_path to a local folder "
                                    "holding an instruct causal LM and its tokenizer (save_pretrained layout)")
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.dtype)).to(config.device)
        self.model.eval()
        self.name = f"{type(self.model).__name__}:{path.name}"

    def _prompt(self, description: str, length: str) -> str:
        user = USER_PROMPT.format(description=description, length=length.replace("_", " "),
                                  words=TARGET_WORDS[length])
        messages = [{"role": "system", "content": self.config.system_prompt}, {"role": "user", "content": user}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{self.config.system_prompt}\n\n{user}\n\nAnswer:"

    def answer(self, description: str, length: str) -> str:
        """The LM's greedy answer for one length."""
        import torch

        enc = self.tokenizer(self._prompt(description, length), return_tensors="pt").to(self.config.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def variants(self, description: str) -> CaptionVariants:
        """All lengths and languages of one description (module docstring: LM first, extractive fallback)."""
        cleaned = split_languages(postprocess_caption(description))
        result = CaptionVariants()
        for length in LENGTHS:
            parsed = parse_answer(self.answer(description, length))
            for lang in LANGUAGES:
                if lang in parsed:
                    text, source = parsed[lang], "lm"
                elif lang in cleaned:
                    text, source = extractive(cleaned[lang], TARGET_WORDS[length]), "extractive"
                else:
                    continue
                result.texts.setdefault(lang, {})[length] = text
                result.sources.setdefault(lang, {})[length] = source
        if not result.texts:
            raise ValueError(f"description {description[:80]!r} gave no caption in {LANGUAGES}")
        return result


def write_tiny_lm(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, seed: int = 0,
                  model_class: str = PRODUCTION_LM_CLASS) -> Path:
    """A tiny random instruct LM of ``model_class`` (the production rewriter's class) with the tokenizer saved in
    ``tokenizer_dir`` (e.g. a tiny pipeline's ``tokenizer/``), in the layout ``CaptionRewriter`` loads. Its answers
    are noise: it exercises the rewrite path, it does not rewrite."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    cls: Any = getattr(transformers, model_class)
    config_cls: Any = getattr(transformers, model_class.replace("ForCausalLM", "Config"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    out = Path(out_dir)
    cls(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out

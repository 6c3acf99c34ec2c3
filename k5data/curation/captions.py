"""Captions: sidecar files or a VLM (Qwen2.5-VL), then the report's post-processing (§4.2, §4.4):
strip introductory phrases ("The image shows", "На изображении показан"...) and keep each language's sentences.

The models are trained on English AND Russian captions (§4.6), so a sentence is kept when its letters are all of one
kept script (Latin for English, Cyrillic for Russian; ``KEPT_SCRIPTS``); sentences in other scripts (CJK, Arabic...)
or mixing scripts inside one word-run are what the captioners produce as OCR noise, and are dropped. The
introductory phrase is stripped from the first sentence of each language."""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from k5data.curation.vlm import VLMUser

CAPTION_PROMPT = {"image": "Describe this image in detail in English.",
                  "video": "Describe this video scene in detail in English."}

_INTRO = re.compile(
    r"^\s*(?:in\s+)?(?:the|this)\s+(?:image|picture|photo(?:graph)?|video|clip|scene|frame)\s+"
    r"(?:(?:shows?|showcases?|depicts?|features?|displays?|presents?|captures?|illustrates?|contains?)(?:\s+that)?"
    r"|(?:starts?|begins?|opens?)(?:\s+(?:with|by))?|is\s+of)\s*[,:]?\s*",
    re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")  # CJK full stops need no space after them


# Russian counterpart of _INTRO: "На изображении (показан|изображен|видно)...", "На видео...", "Это изображение..."
_INTRO_RU = re.compile(
    r"^\s*(?:на\s+(?:этом\s+|данном\s+)?(?:изображении|картинке|фото(?:графии)?|снимке|видео(?:ролике)?|кадре)"
    r"(?:\s+(?:показан[аоы]?|изображен[аоы]?|изображён[аоы]?|видн[аоы]?|представлен[аоы]?|запечатлен[аоы]?))?"
    r"|(?:это|данное)\s+(?:изображение|видео|фото)\s+(?:показывает|изображает|демонстрирует)"
    r"|видео\s+начинается\s+с)\s*[,:]?\s*",
    re.IGNORECASE)
KEPT_SCRIPTS = {"en": "LATIN", "ru": "CYRILLIC"}  # language -> Unicode script name prefix of its letters


def sentence_language(sentence: str, languages: tuple[str, ...] = ("en", "ru")) -> str | None:
    """The language among ``languages`` whose script writes every letter of ``sentence`` (None: no letters, or a
    script that is not kept, or two scripts mixed)."""
    scripts = {unicodedata.name(ch, "").split(" ", 1)[0] for ch in sentence if ch.isalpha()}
    if len(scripts) != 1:
        return None
    script = scripts.pop()
    return next((lang for lang in languages if KEPT_SCRIPTS.get(lang) == script), None)


def split_languages(text: str, languages: tuple[str, ...] = ("en", "ru")) -> dict[str, str]:
    """``text``'s sentences grouped by kept language, each group cleaned (intro phrase stripped, re-capitalised);
    languages with nothing left are absent."""
    sentences = [s.strip() for s in _SENTENCES.split(" ".join(text.split())) if s.strip()]
    groups: dict[str, list[str]] = {}
    for s in sentences:
        lang = sentence_language(s, languages)
        if lang is not None:
            groups.setdefault(lang, []).append(s)
    out = {}
    for lang, kept in groups.items():
        first = (_INTRO_RU if lang == "ru" else _INTRO).sub("", kept[0], count=1)
        kept[0] = first[:1].upper() + first[1:] if first else ""
        joined = " ".join(s for s in kept if s).strip()
        if joined:
            out[lang] = joined
    return out


def postprocess_caption(text: str, languages: tuple[str, ...] = ("en", "ru")) -> str:
    """Keep the sentences of each language in ``languages`` (in order of first appearance; an English and a Russian
    description stay side by side), strip each one's introductory phrase, re-capitalise; '' when nothing is left."""
    return " ".join(split_languages(text, languages).values())


def sidecar_key(media_key: str) -> str:
    return str(PurePosixPath(media_key).with_suffix(".txt"))


def parse_sidecar(text: str) -> dict[int | None, str]:
    """Sidecar text: one caption for the whole file, or lines ``[scene N] caption`` for individual scenes."""
    per_scene: dict[int | None, str] = {}
    rest = []
    for line in text.splitlines():
        m = re.match(r"\s*\[scene\s+(\d+)\]\s*(.*)", line)
        if m:
            per_scene[int(m.group(1))] = m.group(2).strip()
        elif line.strip():
            rest.append(line.strip())
    if rest:
        per_scene[None] = " ".join(rest)
    return per_scene


class MissingCaptioner(ValueError):
    """Media without sidecar captions, no captioner configured and ``captions.require`` true: every row would be
    rejected as ``no_caption``, so curation stops before scoring."""


def has_captioner(cfg: dict[str, Any]) -> bool:
    """Whether the ``captions`` section names a model that can caption media without a sidecar."""
    return cfg["backend"] != "sidecar" and bool(cfg.get("model_path"))


def uncaptioned_message(missing: int, total: int, where: str) -> str:
    """The one line shown when ``missing`` of ``total`` media to score in ``where`` have no sidecar caption and no
    captioner is configured."""
    return (f"{missing} of {total} media files to score in {where} have no caption sidecar (<name>.txt) and no "
            "captioner is configured, so they would all be rejected as no_caption: set captions.backend: qwen2_5_vl "
            "and captions.model_path: <local Qwen2.5-VL folder> in the curation config (k5 curate --captioner PATH), "
            "or captions.require: false to keep uncaptioned rows")


class Captioner(VLMUser):
    """Caption one row: sidecar first (human or upstream captions win), else the configured VLM, else ''."""

    def caption(self, kind: str, frame: np.ndarray, sidecar: dict[int | None, str] | None,
                scene_index: int) -> tuple[str, str, str]:
        """Returns (caption after post-processing, raw text, backend)."""
        if sidecar:
            raw = sidecar.get(scene_index, sidecar.get(None, ""))
            if raw:
                return postprocess_caption(raw), raw, "sidecar"
        if self.vlm is not None:
            raw = self.vlm.generate(CAPTION_PROMPT[kind], frame)
            return postprocess_caption(raw), raw, self.vlm.name
        return "", "", "none"

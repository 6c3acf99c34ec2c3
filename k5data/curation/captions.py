"""Captions: sidecar files or a VLM (Qwen2.5-VL), then the report's post-processing (§4.2, §4.4):
strip introductory phrases ("The image shows", "The video starts with"...) and drop sentences with non-Latin
script (Cyrillic, CJK...), which the captioners produce as OCR noise."""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath

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


def _latin_only(sentence: str) -> bool:
    for ch in sentence:
        if ch.isalpha() and not unicodedata.name(ch, "").startswith("LATIN"):
            return False
    return True


def postprocess_caption(text: str) -> str:
    """Drop non-Latin sentences, strip an introductory phrase, re-capitalise; '' when nothing is left."""
    sentences = [s.strip() for s in _SENTENCES.split(" ".join(text.split())) if s.strip()]
    kept = [s for s in sentences if _latin_only(s)]
    if not kept:
        return ""
    first = _INTRO.sub("", kept[0], count=1)
    kept[0] = first[:1].upper() + first[1:] if first else ""
    return " ".join(s for s in kept if s).strip()


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

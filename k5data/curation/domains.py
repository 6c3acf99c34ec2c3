"""Domains (report §4.6: VLM classification into CATEGORY_LIST with PROMPT_TEMPLATE) and k-means clusters over
embeddings for balanced sampling (§4.4; k = 10,000 in production, from the config)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from k5data.curation.vlm import VLMUser

# Verbatim from the report, §4.6.
CATEGORY_LIST = """
1) animals
2) architecture
3) art
4) cartoons
5) food
6) interiors
7) nature
8) people
9) tech
10) other
"""

PROMPT_TEMPLATE = """
You are a professional {media_type} classificator. You are given a {media_type}.
Your task is to return one of the following classes this {media_type} relates to the most.
Choose one class from the following classes:
{CATEGORY_LIST}
Return only the name of class.
""".strip()

CATEGORIES = [line.split(")", 1)[1].strip() for line in CATEGORY_LIST.strip().splitlines()]

# Offline default ("keywords-v1"): caption words that point at a domain; first category with a hit wins.
KEYWORDS = {
    "cartoons": "cartoon animated animation bunny character",
    "animals": "cat dog kitten puppy bird horse animal animals fish cow wildlife insect",
    "people": "man woman person people astronaut child boy girl rider riders cyclist cyclists face driver",
    "food": "coffee cup food meal dish plate fruit cake drink breakfast",
    "tech": "rocket car computer phone machine robot engine camera cars",
    "architecture": "building palace temple tower bridge castle architecture church roof facade house",
    "interiors": "room interior kitchen sofa bedroom office hall",
    "art": "painting drawing sculpture artwork art illustration canvas",
    "nature": "flower flowers tree forest mountain lake river sea beach sky field garden grass landscape",
}


def prompt_for(media_type: str) -> str:
    return PROMPT_TEMPLATE.format(media_type=media_type, CATEGORY_LIST=CATEGORY_LIST)


def parse_domain(answer: str) -> str:
    """Map a free-form VLM answer to a category ('other' when nothing matches)."""
    text = answer.lower()
    for cat in CATEGORIES:
        if re.search(rf"\b{cat}\b", text):
            return cat
    return "other"


def keyword_domain(caption: str) -> str:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    for cat, keys in KEYWORDS.items():
        if words & set(keys.split()):
            return cat
    return "other"


class DomainClassifier(VLMUser):
    """The VLM's domain of a row (report §4.1), or a keyword match on its caption offline."""

    def classify(self, kind: str, frame: np.ndarray, caption: str) -> tuple[str, str]:
        """Returns (domain, backend)."""
        if self.vlm is not None:
            answer = self.vlm.generate(prompt_for(kind), frame, max_new_tokens=8)
            return parse_domain(answer), self.vlm.name
        if self.cfg["backend"] != "keywords":
            raise ValueError(f"unknown domains backend {self.cfg['backend']!r}")
        return keyword_domain(caption), "keywords-v1"


def thumbnail_embedding(rgb: np.ndarray) -> np.ndarray:
    """Offline embedding ("thumbnail-v1"): 8x8 colour layout + 8-bin hue/saturation histograms, L2-normalised."""
    import cv2

    layout = cv2.resize(rgb, (8, 8), interpolation=cv2.INTER_AREA).astype(np.float32).ravel() / 255.0
    hsv = cv2.cvtColor(cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2HSV)
    hue = np.bincount((hsv[..., 0].ravel().astype(int) * 8) // 180, minlength=8) / 4096.0
    sat = np.bincount((hsv[..., 1].ravel().astype(int) * 8) // 256, minlength=8) / 4096.0
    vec = np.concatenate([layout, 4.0 * hue, 4.0 * sat])
    return vec / (np.linalg.norm(vec) + 1e-8)


def kmeans_clusters(embeddings: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, Any]:
    """Cluster ids for each row; k is capped at the number of distinct rows (a demo corpus is tiny)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n_unique = len(np.unique(embeddings.round(6), axis=0))
    k = max(1, min(k, n_unique))
    # MiniBatchKMeans scales to 10,000 clusters over millions of rows; plain KMeans is exact for small sets.
    algo = MiniBatchKMeans if len(embeddings) > 50_000 else KMeans
    model = algo(n_clusters=k, random_state=seed, n_init=3).fit(embeddings)
    return model.labels_.astype(int), model

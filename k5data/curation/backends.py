"""Production scorer backends: local model folders loaded with ``from_pretrained`` (never downloaded).

* ``HFImageClassifier``: any transformers image-classification checkpoint (watermark classifier, TOPIQ / Q-Align /
  DOVER style quality heads exported as classifiers, CLIP-based classifiers); the score is the probability of
  ``positive_label``.
* ``ClipEmbedder``: CLIP image embeddings for k-means clusters.
* ``Sam2Counter``: SAM 2 automatic mask generation; the mask count is the segmentation-based complexity term.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def _require(path: str | os.PathLike | None, what: str) -> Path:
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"{what}: model folder {path!r} not found (configure a local model path)")
    return Path(path)


class HFImageClassifier:
    def __init__(self, model_path: str | os.PathLike, positive_label: str) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = _require(model_path, "image classifier")
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True).eval()
        labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        if positive_label.lower() not in labels:
            raise ValueError(f"{path} has no label {positive_label!r} (labels: {sorted(labels)})")
        self.index = labels[positive_label.lower()]
        self.name = f"hf-image-classifier:{path.name}"
        self._torch = torch

    def probability(self, rgb: np.ndarray) -> float:
        inputs = self.processor(images=[rgb], return_tensors="pt")
        with self._torch.no_grad():
            logits = self.model(**inputs).logits[0]
        return float(logits.softmax(-1)[self.index])


class ClipEmbedder:
    name = "clip"

    def __init__(self, model_path: str | os.PathLike) -> None:
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        path = _require(model_path, "CLIP embedder")
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval()
        self._torch = torch

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            out = self.model(**self.processor(images=[rgb], return_tensors="pt")).image_embeds[0].numpy()
        return out / (np.linalg.norm(out) + 1e-8)


class Sam2Counter:
    name = "sam2"

    def __init__(self, model_path: str | os.PathLike) -> None:
        from transformers import pipeline

        self.pipe = pipeline("mask-generation", model=str(_require(model_path, "SAM 2")), device="cpu")

    def count(self, rgb: np.ndarray) -> int:
        from PIL import Image

        return len(self.pipe(Image.fromarray(rgb), points_per_batch=64)["masks"])


_LOADED: dict[tuple, Any] = {}


def cached(cls: type, *args: Any) -> Any:
    """One instance per (class, arguments) and process: models load once per run."""
    key = (cls.__name__, *map(str, args))
    if key not in _LOADED:
        _LOADED[key] = cls(*args)
    return _LOADED[key]

"""Image embeddings of the editing-pair mining: CLIP (semantic), DINOv2 (visual) and face crops.

Model backends load local folders with ``from_pretrained`` (nothing is downloaded); the offline "thumbnail"
backends are documented pixel features used by the demo, whose tiny models have random weights and would make every
similarity meaningless:

* clip "thumbnail-colour-hog-v1": colour histogram + HOG of the grey thumbnail (scene and layout);
* dino "thumbnail-lab-v1": the 24x24 Lab thumbnail, zero-mean per channel (colour cross-correlation: high for the
  same picture, lowered by pasted or recoloured regions);
* face crops "hog-face-v1": HOG of the 64x64 crop.

Faces (report: "only single-face images considered"): scikit-image's LBP frontal-face cascade (shipped in the
wheel) finds them; an image with exactly one face gets that crop's embedding, any other count gets none, and a pair
without a face on both sides has face_sim 0 (the rules read 0 as "no faces").
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from k5data.curation.backends import Dinov2Embedder, _require, cached


class Embedder(Protocol):
    name: str

    def embed(self, rgb: np.ndarray) -> np.ndarray: ...


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32).ravel()
    return v / (float(np.linalg.norm(v)) + 1e-8)


class ColourThumbnail:
    """Colour histogram (8 levels per channel, square-rooted) and HOG of the 64x64 grey thumbnail, weighted 0.3 /
    0.7 in the cosine: the HOG half keeps a restyled picture of the same scene close (measured on the demo's
    posterised temple: 0.82; unrelated photos 0.72-0.80)."""

    name = "thumbnail-colour-hog-v1"

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        import cv2
        from skimage.feature import hog

        q = (rgb // 32).reshape(-1, 3).astype(np.int64)
        hist = np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512).astype(np.float32)
        hist = _unit(np.sqrt(hist / hist.sum()))
        g = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA)
        shape = _unit(hog(g, orientations=8, pixels_per_cell=(16, 16), cells_per_block=(1, 1)))
        return _unit(np.concatenate([np.sqrt(0.3) * hist, np.sqrt(0.7) * shape]))


class LabThumbnail:
    """The 24x24 Lab thumbnail, each channel zero-mean, unit-norm overall: its cosine is a colour cross-correlation
    (a recoloured region lowers it; a global brightness change does not)."""

    name = "thumbnail-lab-v1"

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        import cv2

        lab = cv2.cvtColor(cv2.resize(rgb, (24, 24), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2LAB)
        lab = lab.astype(np.float32)
        return _unit(lab - lab.mean(axis=(0, 1)))


class HogFace:
    """HOG of the face crop at 64x64 (tolerates the detector's box jitter better than raw pixels)."""

    name = "hog-face-v1"

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        import cv2
        from skimage.feature import hog

        g = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA)
        return _unit(hog(g, pixels_per_cell=(8, 8), cells_per_block=(2, 2)))


class HFImageEmbedder:
    """Any transformers vision backbone folder (e.g. a ViT face-recognition export): the pooled output, else the CLS
    token. CLIP and DINOv2 come from ``k5data.curation.backends`` (the curation's own loaders)."""

    def __init__(self, model_path: str | os.PathLike, what: str) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        path = _require(model_path, what)
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.name = f"{what}:{path.name}"
        self._torch = torch

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            out = self.model(**self.processor(images=[rgb], return_tensors="pt"))
        pooled = getattr(out, "pooler_output", None)
        vec = pooled[0] if pooled is not None else out.last_hidden_state[0, 0]
        return _unit(vec.numpy())


class ClipVision:
    """CLIP image embeddings (``image_embeds``) from the vision tower and projection only: loads a full CLIP folder
    (the curation's scene classifier's) or a vision-only export, without the text tower and tokenizer that
    ``k5data.curation.backends.ClipEmbedder`` loads for zero-shot labels, which mining never uses."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        import torch
        from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

        path = _require(model_path, "CLIP embedder")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if hasattr(config, "vision_config"):  # a full CLIP folder: its projection width is the top-level one
            config.vision_config.projection_dim = config.projection_dim
            config = config.vision_config
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = CLIPVisionModelWithProjection.from_pretrained(path, config=config, local_files_only=True).eval()
        self.name = f"clip:{path.name}"
        self._torch = torch

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            out = self.model(**self.processor(images=[rgb], return_tensors="pt"))
        return _unit(out.image_embeds[0].numpy())


class OneImage:
    """One image at a time through a curation backend's batched ``embed_many`` (the same loaded model)."""

    def __init__(self, backend: Any, name: str) -> None:
        self.backend, self.name = backend, name

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        return self.backend.embed_many([rgb])[0]


def clip_embedder(backend: str, model_path: str | None) -> Embedder:
    if backend == "thumbnail":
        return ColourThumbnail()
    if backend == "clip":
        return cached(ClipVision, model_path)
    raise ValueError(f"clip_backend {backend!r} is not one of thumbnail, clip")


def dino_embedder(backend: str, model_path: str | None) -> Embedder:
    if backend == "thumbnail":
        return LabThumbnail()
    if backend == "dinov2":
        return OneImage(cached(Dinov2Embedder, model_path), "dinov2")
    raise ValueError(f"dino_backend {backend!r} is not one of thumbnail, dinov2")


class FaceEmbedder:
    """One face per image or nothing: the cascade's detections, then the crop's embedding."""

    def __init__(self, backend: str, model_path: str | None, detect_side: int = 320) -> None:
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade

        self.detector = Cascade(lbp_frontal_face_cascade_filename())
        if backend == "thumbnail":
            self.crop_embedder: Embedder = HogFace()
        elif backend == "hf":
            self.crop_embedder = cached(HFImageEmbedder, model_path, "face")
        else:
            raise ValueError(f"face_backend {backend!r} is not one of thumbnail, hf")
        self.name = f"lbp-cascade+{self.crop_embedder.name}"
        self.detect_side = detect_side

    def faces(self, rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (row, col, height, width) in ``rgb``'s pixels."""
        import cv2

        h, w = rgb.shape[:2]
        s = min(1.0, self.detect_side / max(h, w))
        g = cv2.cvtColor(cv2.resize(rgb, (round(w * s), round(h * s))), cv2.COLOR_RGB2GRAY)
        least = max(24, self.detect_side // 8)  # faces under 1/8 of the long side are too small to match (and slow)
        found = self.detector.detect_multi_scale(g, scale_factor=1.2, step_ratio=1, min_size=(least, least),
                                                 max_size=(g.shape[0], g.shape[1]), min_neighbor_number=4)
        return [(round(d["r"] / s), round(d["c"] / s), round(d["height"] / s), round(d["width"] / s))
                for d in found]

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        boxes = self.faces(rgb)
        if len(boxes) != 1:
            return None
        r, c, h, w = boxes[0]
        return self.crop_embedder.embed(np.ascontiguousarray(rgb[r:r + h, c:c + w]))


def face_similarity(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Cosine of two single-face embeddings; 0.0 when either image has no single face."""
    if a is None or b is None:
        return 0.0
    return float(np.clip(np.dot(a, b), -1.0, 1.0))


def embed_all(images: list[np.ndarray], embedder: Embedder) -> np.ndarray:
    return np.stack([embedder.embed(im) for im in images]).astype(np.float32)


def describe(*embedders: Any) -> str:
    return "+".join(e.name for e in embedders)

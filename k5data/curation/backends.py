"""Production scorer backends: local model folders loaded with ``from_pretrained`` (never downloaded; every loader
passes ``local_files_only``). Each class is the code path of one family of models in
``configs/curation-production.yaml``; the tests build tiny random-weight models of the same transformers classes,
save them with ``save_pretrained`` and load them through these classes.

* ``HFImageClassifier``: any transformers image-classification checkpoint (watermark classifier, TOPIQ-class
  technical / aesthetic quality heads exported as classifiers); the score is the probability of ``positive_label``.
* ``HFObjectDetector``: any transformers object-detection checkpoint (RT-DETR, YOLOS, DETR): the watermark detector
  and the YOLO-class object classes of §4.1.
* ``HFVideoRegressor``: a video model with a regression head (``VideoMAEForVideoClassification``, ``problem_type``
  regression), outputs named by ``id2label``: the DOVER-class clip quality (technical, aesthetic) and the report's
  VideoMAE camera / object / light dynamics model.
* ``ClipZeroShot``: CLIP zero-shot classification of an image over label sets (location, style, subject, place);
  its image embeddings are the cluster embeddings (``ClipEmbedder`` loads only the vision tower for that).
* ``Sam2Counter``: SAM 2 automatic masks (a grid of point prompts, filtered by predicted IoU and stability, duplicates
  merged) counted as the segmentation term of complexity.
* ``Dinov2Embedder``: DINOv2 CLS embeddings (the editing-pair miners' DINO similarity).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def _require(path: str | os.PathLike | None, what: str) -> Path:
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"{what}: model folder {path!r} not found (configure a local model path)")
    return Path(path)


def _device(model: Any, device: str) -> Any:
    return model.to(device).eval()


class HFImageClassifier:
    def __init__(self, model_path: str | os.PathLike, positive_label: str, device: str = "cpu") -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = _require(model_path, "image classifier")
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = _device(AutoModelForImageClassification.from_pretrained(path, local_files_only=True), device)
        labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        if positive_label.lower() not in labels:
            raise ValueError(f"{path} has no label {positive_label!r} (labels: {sorted(labels)})")
        self.index = labels[positive_label.lower()]
        self.name = f"hf-image-classifier:{path.name}"
        self.device = device
        self._torch = torch

    def probabilities(self, frames: list[np.ndarray]) -> list[float]:
        """Probability of the positive label for each frame (one batch)."""
        inputs = self.processor(images=list(frames), return_tensors="pt").to(self.device)
        with self._torch.no_grad():
            logits = self.model(**inputs).logits
        return [float(p) for p in logits.float().softmax(-1)[:, self.index].cpu()]

    def probability(self, rgb: np.ndarray) -> float:
        return self.probabilities([rgb])[0]


class HFObjectDetector:
    """Boxes with labels and scores from a local transformers detection model (``AutoModelForObjectDetection``)."""

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu") -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        path = _require(model_path, "object detector")
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = _device(AutoModelForObjectDetection.from_pretrained(path, local_files_only=True), device)
        self.labels = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        self.name = f"hf-object-detector:{path.name}"
        self.device = device
        self._torch = torch

    def detect(self, frames: list[np.ndarray], min_score: float = 0.0) -> list[list[tuple[str, float]]]:
        """Per frame, the (label, score) of every box scoring at least ``min_score``, best first."""
        inputs = self.processor(images=list(frames), return_tensors="pt").to(self.device)
        with self._torch.no_grad():
            outputs = self.model(**inputs)
        sizes = [f.shape[:2] for f in frames]
        found = self.processor.post_process_object_detection(outputs, threshold=min_score, target_sizes=sizes)
        out = []
        for det in found:
            pairs = [(self.labels.get(int(lab), str(int(lab))), float(s))
                     for lab, s in zip(det["labels"].cpu(), det["scores"].cpu())]
            out.append(sorted(pairs, key=lambda p: -p[1]))
        return out

    def label_scores(self, frames: list[np.ndarray], labels: list[str]) -> list[float]:
        """Per frame, the highest probability any query gives one of ``labels`` (the watermark detector's
        confidence), read from the class logits whether or not that label is the query's top class: DETR / YOLOS
        heads end with a no-object class (softmax), RT-DETR's do not (sigmoid)."""
        wanted = [i for i, name in self.labels.items() if name.lower() in {label.lower() for label in labels}]
        if not wanted:
            raise ValueError(f"{self.name} has none of the labels {labels} (labels: {sorted(self.labels.values())})")
        inputs = self.processor(images=list(frames), return_tensors="pt").to(self.device)
        with self._torch.no_grad():
            logits = self.model(**inputs).logits.float()
        probs = logits.softmax(-1)[..., :-1] if logits.shape[-1] == len(self.labels) + 1 else logits.sigmoid()
        return [float(v) for v in probs[..., wanted].amax(dim=(1, 2)).cpu()]


def even_frames(frames: list[np.ndarray], n: int) -> list[np.ndarray]:
    """``n`` frames evenly spaced over ``frames`` (repeating when there are fewer)."""
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]


class HFVideoRegressor:
    """Named regression outputs of a local video model over one clip (``AutoModelForVideoClassification``)."""

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu") -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForVideoClassification

        path = _require(model_path, "video model")
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = _device(AutoModelForVideoClassification.from_pretrained(path, local_files_only=True), device)
        self.outputs = [str(self.model.config.id2label[i]).lower() for i in range(self.model.config.num_labels)]
        self.num_frames = int(getattr(self.model.config, "num_frames", 16))
        self.name = f"hf-video-regressor:{path.name}"
        self.device = device
        self._torch = torch

    def scores(self, frames: list[np.ndarray]) -> dict[str, float]:
        """Output name -> raw regression value for the clip made of ``frames`` (resampled to the model's length)."""
        clip = even_frames(frames, self.num_frames)
        inputs = self.processor(videos=[clip], return_tensors="pt") if _takes_videos(self.processor) else \
            self.processor([clip], return_tensors="pt")
        with self._torch.no_grad():
            values = self.model(**inputs.to(self.device)).logits[0].float().cpu().tolist()
        return dict(zip(self.outputs, values))


def _takes_videos(processor: Any) -> bool:
    import inspect

    return "videos" in inspect.signature(processor.__call__).parameters


class ClipZeroShot:
    """CLIP zero-shot labels: each label set's prompts are embedded once; an image gets the label of highest
    softmax probability (logit scale from the checkpoint) in every set."""

    def __init__(self, model_path: str | os.PathLike, label_sets: dict[str, list[str]], template: str = "a photo of {}",
                 device: str = "cpu") -> None:
        import torch
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = _require(model_path, "CLIP classifier")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = _device(CLIPModel.from_pretrained(path, local_files_only=True), device)
        self.name = f"clip-zero-shot:{path.name}"
        self.device = device
        self._torch = torch
        self.label_sets = {k: list(v) for k, v in label_sets.items()}
        self.text = {}
        with torch.no_grad():
            for key, labels in self.label_sets.items():
                tok = self.tokenizer([template.format(label) for label in labels], padding=True, return_tensors="pt")
                emb = _features(self.model.get_text_features(**tok.to(device)))
                self.text[key] = emb / emb.norm(dim=-1, keepdim=True)

    def image_embeddings(self, frames: list[np.ndarray]) -> Any:
        with self._torch.no_grad():
            px = self.processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)
            emb = _features(self.model.get_image_features(pixel_values=px)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def embed_many(self, frames: list[np.ndarray]) -> np.ndarray:
        """L2-normalised image embeddings, one row per frame."""
        return self.image_embeddings(frames).cpu().numpy()

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        return self.embed_many([rgb])[0]

    def classify(self, frames: list[np.ndarray]) -> dict[str, tuple[str, float]]:
        """Label set -> (label, probability) for the mean embedding of ``frames`` (one image or a scene's frames)."""
        emb = self.image_embeddings(frames).mean(0, keepdim=True)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        scale = float(self.model.logit_scale.detach().exp())
        out = {}
        for key, text in self.text.items():
            probs = (scale * emb @ text.T).softmax(-1)[0]
            best = int(probs.argmax())
            out[key] = (self.label_sets[key][best], float(probs[best]))
        return out


def _features(out: Any) -> Any:
    # transformers 5 may return a model output whose pooled projection is the features
    return out if hasattr(out, "norm") else out.pooler_output


class ClipEmbedder(ClipZeroShot):
    """CLIP image embeddings (L2-normalised) for k-means clusters, from the same full CLIP folder as the zero-shot
    classifier (one load serves both when the paths agree)."""

    name = "clip"

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu") -> None:
        super().__init__(model_path, {}, device=device)


class Dinov2Embedder:
    """DINOv2 CLS-token embeddings (L2-normalised) from a local ``Dinov2Model`` folder."""

    name = "dinov2"

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu") -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        path = _require(model_path, "DINOv2 embedder")
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = _device(AutoModel.from_pretrained(path, local_files_only=True), device)
        self.device = device
        self._torch = torch

    def embed_many(self, frames: list[np.ndarray]) -> np.ndarray:
        with self._torch.no_grad():
            px = self.processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)
            out = self.model(pixel_values=px).last_hidden_state[:, 0].float().cpu().numpy()
        return out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-8)


class Sam2Counter:
    """Number of distinct SAM 2 masks on a grid of point prompts (SAM's automatic mask generation, batched).

    The preprocessing (resize to the model's square input, ImageNet normalisation) is read from the folder's
    ``preprocessor_config.json`` and done here: transformers' SAM 2 image processor needs torchvision, which this
    environment does not install."""

    name = "sam2"

    def __init__(self, model_path: str | os.PathLike, points_per_side: int = 32, pred_iou_thresh: float = 0.8,
                 stability_thresh: float = 0.9, min_area: float = 0.005, dedup_iou: float = 0.7,
                 device: str = "cpu") -> None:
        import torch
        from transformers import Sam2Model

        path = _require(model_path, "SAM 2")
        self.model = _device(Sam2Model.from_pretrained(path, local_files_only=True), device)
        pre_file = path / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.exists() else {}
        size = self.model.config.vision_config.backbone_config.image_size
        self.side = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.mean = np.array(pre.get("image_mean", [0.485, 0.456, 0.406]), np.float32)
        self.std = np.array(pre.get("image_std", [0.229, 0.224, 0.225]), np.float32)
        self.points_per_side, self.pred_iou_thresh = points_per_side, pred_iou_thresh
        self.stability_thresh, self.min_area, self.dedup_iou = stability_thresh, min_area, dedup_iou
        self.device = device
        self._torch = torch

    def masks(self, rgb: np.ndarray) -> np.ndarray:
        """Kept masks (N, h, w) bool at the decoder's resolution."""
        import cv2

        torch = self._torch
        x = cv2.resize(rgb, (self.side, self.side), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        px = torch.from_numpy(((x - self.mean) / self.std).transpose(2, 0, 1))[None].to(self.device)
        n = self.points_per_side
        grid = (np.stack(np.meshgrid(np.arange(n), np.arange(n)), -1).reshape(-1, 2) + 0.5) * (self.side / n)
        kept_logits, kept_scores = [], []
        with torch.no_grad():
            emb = self.model.get_image_embeddings(px)
            for start in range(0, len(grid), 64):
                pts = torch.tensor(grid[start:start + 64], dtype=torch.float32, device=self.device)[None, :, None]
                labels = torch.ones(pts.shape[:3], dtype=torch.long, device=self.device)
                out = self.model(image_embeddings=emb, input_points=pts, input_labels=labels, multimask_output=True)
                logits = out.pred_masks[0].flatten(0, 1).float()  # (points * 3, h, w)
                scores = out.iou_scores[0].flatten().float()
                stability = ((logits > 1).sum((1, 2)) / (logits > -1).sum((1, 2)).clamp(min=1))
                area = (logits > 0).float().mean((1, 2))
                keep = (scores >= self.pred_iou_thresh) & (stability >= self.stability_thresh) & \
                    (area >= self.min_area)
                kept_logits.append(logits[keep] > 0)
                kept_scores.append(scores[keep])
        masks, scores = torch.cat(kept_logits), torch.cat(kept_scores)
        return _dedupe(masks, scores, self.dedup_iou).cpu().numpy()

    def count(self, rgb: np.ndarray) -> int:
        return int(len(self.masks(rgb)))


def _dedupe(masks: Any, scores: Any, iou: float, side: int = 64) -> Any:
    """Greedy non-maximum suppression on mask IoU (best predicted IoU first), IoU measured on ``side``-px copies
    of the masks; one vectorised suppression step per kept mask."""
    import torch

    if not len(masks):
        return masks
    masks = masks[scores.argsort(descending=True)]
    small = torch.nn.functional.interpolate(masks[:, None].float(), size=(side, side), mode="area").flatten(1)
    small = (small > 0.5).float()
    areas = small.sum(1)
    suppressed = torch.zeros(len(masks), dtype=torch.bool, device=masks.device)
    keep = []
    for i in range(len(masks)):
        if suppressed[i]:
            continue
        keep.append(i)
        inter = small @ small[i]
        suppressed |= inter / (areas + areas[i] - inter).clamp(min=1) > iou
    return masks[keep]


_LOADED: dict[tuple, Any] = {}


def cached(cls: type, *args: Any, **kwargs: Any) -> Any:
    """One instance per (class, arguments) and process: models load once per run."""
    key = (cls.__name__, *map(str, args), *(f"{k}={v}" for k, v in sorted(kwargs.items())))
    if key not in _LOADED:
        _LOADED[key] = cls(*args, **kwargs)
    return _LOADED[key]

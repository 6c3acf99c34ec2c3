"""Qwen2.5-VL backend shared by the captioner, the domain classifier (report §4.2, §4.6) and the Q-Align-style quality
scorer (§4.2: level-word probabilities after "The quality of the image is").

Loads a local folder with ``from_pretrained`` (no download): the model, its tokenizer and its image processor
(``preprocessor_config.json``). The chat prompt is assembled here with the Qwen vision tokens, so the same code
drives a real Qwen2.5-VL checkpoint and the tiny random one the tests build. Video scenes are described from
their middle frame (the report's Tarsier2 video captioner would take the clip; not wired here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

SYSTEM = "You are a helpful assistant."


class QwenVL:
    """Generate text for (image, prompt) pairs with a local Qwen2.5-VL checkpoint."""

    name = "qwen2_5_vl"

    def __init__(self, model_path: str | os.PathLike, max_new_tokens: int = 96, device: str = "cpu") -> None:
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"VLM folder {path} does not exist (set captions.model_path / domains.model_path)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True,
                                                                        dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.merge = int(getattr(self.image_processor, "merge_size", 2))
        self.last_new_tokens = 0

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        vision = "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>" if n_image_tokens else ""
        text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{vision}{prompt}<|im_end|>\n"
                "<|im_start|>assistant\n")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _vision(self, image: np.ndarray | None) -> tuple[dict[str, Any], int]:
        """Model inputs for ``image`` and its number of image tokens."""
        if image is None:
            return {}, 0
        from PIL import Image

        vision = self.image_processor(images=[Image.fromarray(image)], return_tensors="pt")
        kwargs = {"pixel_values": vision["pixel_values"].to(self.device),
                  "image_grid_thw": vision["image_grid_thw"].to(self.device)}
        return kwargs, int(vision["image_grid_thw"].prod()) // (self.merge**2)

    def generate(self, prompt: str, image: np.ndarray | None = None, max_new_tokens: int | None = None) -> str:
        import torch

        kwargs, n_tokens = self._vision(image)
        ids = torch.tensor([self.prompt_ids(prompt, n_tokens)], device=self.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens or self.max_new_tokens, **kwargs)
        new = out[0, ids.shape[1]:]
        self.last_new_tokens = int(new.numel())  # for logs and tests
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def level_score(self, prompt: str, answer_prefix: str, image: np.ndarray,
                    levels: dict[str, float]) -> float:
        """Q-Align's readout (Wu et al. 2023): after ``answer_prefix`` ("The quality of the image is"), the
        softmax over the level words (excellent, good, fair, poor, bad), weighted by their values (5..1). When every
        level word starts with its own token (Qwen2.5-VL's vocabulary) that is one forward pass over first-token
        logits, as in Q-Align; a tokenizer that splits the words (the tests' tiny BPE) scores each word's whole
        token sequence instead (one pass per word)."""
        import torch

        words = list(levels)
        seqs = [self.tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
        kwargs, n_tokens = self._vision(image)
        base = self.prompt_ids(prompt, n_tokens) + self.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]

        def logits_of(ids: list[int]) -> Any:
            ids_t = torch.tensor([ids], device=self.device)
            with torch.no_grad():
                return self.model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), **kwargs).logits[0].float()

        first = [s[0] for s in seqs]
        if len(set(first)) == len(first):
            scores = logits_of(base)[-1].log_softmax(-1)[first]
        else:
            rows = []
            for seq in seqs:
                logp = logits_of(base + seq)[len(base) - 1:-1].log_softmax(-1)
                rows.append(logp[torch.arange(len(seq)), torch.tensor(seq)].sum())
            scores = torch.stack(rows)
        probs = scores.softmax(-1).cpu().numpy()
        return float(np.dot(probs, [levels[w] for w in words]))


QALIGN_LEVELS = {"excellent": 5.0, "good": 4.0, "fair": 3.0, "poor": 2.0, "bad": 1.0}
QALIGN_PROMPTS = {"quality": ("How would you rate the quality of this image?", "The quality of the image is"),
                  "aesthetic": ("How would you rate the aesthetics of this image?", "The aesthetics of the image is")}


def qalign_scores(vlm: QwenVL, frames: list[np.ndarray]) -> dict[str, float]:
    """Q-Align quality and aesthetic scores in [1, 5], averaged over ``frames`` (video: the sampled frames)."""
    return {k: float(np.mean([vlm.level_score(q, a, f, QALIGN_LEVELS) for f in frames]))
            for k, (q, a) in QALIGN_PROMPTS.items()}


_CACHE: dict[tuple, QwenVL] = {}


def load_vlm(model_path: str | os.PathLike, max_new_tokens: int = 96) -> QwenVL:
    """One loaded model per folder and process (captioner and domain classifier share it)."""
    key = (str(Path(model_path).resolve()), max_new_tokens)
    if key not in _CACHE:
        _CACHE[key] = QwenVL(model_path, max_new_tokens)
    return _CACHE[key]


class VLMUser:
    """A curation step with an optional VLM backend (``cfg["backend"] == "qwen2_5_vl"``), loaded on first use from
    ``cfg["model_path"]`` so runs with other backends never load it."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self._vlm: QwenVL | None = None

    @property
    def vlm(self) -> QwenVL | None:
        if self._vlm is None and self.cfg["backend"] == "qwen2_5_vl":
            self._vlm = load_vlm(self.cfg["model_path"], self.cfg.get("max_new_tokens", 96))
        return self._vlm

"""Qwen2.5-VL backend shared by the captioner and the domain classifier (report §4.2, §4.6).

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

    def generate(self, prompt: str, image: np.ndarray | None = None, max_new_tokens: int | None = None) -> str:
        import torch
        from PIL import Image

        kwargs: dict[str, Any] = {}
        n_tokens = 0
        if image is not None:
            vision = self.image_processor(images=[Image.fromarray(image)], return_tensors="pt")
            kwargs = {"pixel_values": vision["pixel_values"].to(self.device),
                      "image_grid_thw": vision["image_grid_thw"].to(self.device)}
            n_tokens = int(vision["image_grid_thw"].prod()) // (self.merge**2)
        ids = torch.tensor([self.prompt_ids(prompt, n_tokens)], device=self.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens or self.max_new_tokens, **kwargs)
        new = out[0, ids.shape[1]:]
        self.last_new_tokens = int(new.numel())  # for logs and tests
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()


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

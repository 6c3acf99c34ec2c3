"""Text encoders of Kandinsky 5.0: Qwen2.5-VL hidden states (per token) and CLIP ViT-L/14 pooled output.

Qwen semantics follow the official inference code (kandinskylab/kandinsky-5, ``text_embedders.py``), not diffusers':
the system prompts keep the trained typo "promt", the template prefix is cropped off, and a boolean mask marks the real
prompt tokens. The crop is computed as the token length of the template prefix (everything before ``{}``) with the
loaded tokenizer. Checked against the real Qwen vocabulary (its BPE ranks), this gives the official 129 (video),
41 (image) and 132 (i2v) exactly; e.g. the image prefix tokenises as ``<|im_start|> system \\n You are a prom t
engineer . Describe the image by detailing the color , shape , size , texture , quantity , text , spatial
relationships of the objects and background : <|im_end|> \\n <|im_start|> user \\n`` = 41 tokens. diffusers spells
"prompt" (one token instead of " prom"+"t") and so crops one token less (128/40/54). The other official splits are
" dynam|ism", " scre|n" (typo "scren") and " post|processing". Editing is the exception: its prefix is 52 tokens
but the official code crops 55, i.e. it also drops the first 3 prompt tokens; pass
``crop_start=OFFICIAL_CROP["edit"]`` to reproduce that. ``OFFICIAL_CROP`` records the official numbers;
``crop_start=`` overrides the computed crop.

Instruct editing (report §6.3.1) feeds the source image to Qwen2.5-VL, as the official ``image_edit`` path does: the
prompt in the edit template, then ``<|vision_start|><|image_pad|>…<|vision_end|><|im_end|>`` with one pad token per
merged vision patch, the image at half the generation resolution (``edit_image_for_qwen``) through the model's image
processor (``preprocessor_config.json`` beside the tokenizer or the model; the Qwen2.5-VL defaults otherwise). The
hidden states of the image tokens stay in the text context, as in the official code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

logger = logging.getLogger(__name__)

TASKS = ("video", "image", "i2v", "edit")

_VIDEO_LINES = (
    "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
)
_STYLE_LINES = (
    "Describe the dynamism of the video and presented actions.",
    "Name the visual style of the video: whether it is a professional footage, user generated content, some kind of "
    "animation, video game or scren content.",
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
)
_USER = "<|im_start|>user\n{}<|im_end|>"

# Official templates (lines joined with "\n"). Typos "promt" and "scren" are kept: the model was trained with them.
PROMPT_TEMPLATES: dict[str, str] = {
    "video": "\n".join(
        ("<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",)
        + _VIDEO_LINES
        + ("Describe the location of the video, main characters or objects and their action.",)
        + _STYLE_LINES
        + (_USER,)
    ),
    "i2v": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Your task is to create a highly detailed and effective "
            "video description based on a provided input image.",
        )
        + _VIDEO_LINES
        + ("Describe main characters actions.",)
        + _STYLE_LINES
        + (_USER,)
    ),
    "image": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, size, "
            "texture, quantity, text, spatial relationships of the objects and background:<|im_end|>",
            _USER,
        )
    ),
    # Editing: the source image's vision tokens and <|im_end|> follow the prompt (EDIT_IMAGE_SUFFIX, per image).
    "edit": "\n".join(
        (
            "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) and target "
            "image (second image), create an interesting text prompt that can be used together with the source image "
            "to create the target image:<|im_end|>",
            "<|im_start|>user\n{}",
        )
    ),
}

# Crop lengths of the official code (prefix_length() gives these for the real tokenizer, except edit: 52).
OFFICIAL_CROP: dict[str, int] = {"video": 129, "image": 41, "edit": 55, "i2v": 132}
DEFAULT_MAX_LENGTH: dict[str, int] = {"video": 256, "i2v": 256, "image": 512, "edit": 512}
VISION_START, IMAGE_PAD, VISION_END, IM_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_end|>"
CLIP_MAX_LENGTH = 77


def edit_image_for_qwen(image: np.ndarray) -> np.ndarray:
    """The source image as the official edit path shows it to Qwen2.5-VL: uint8 (H, W, 3) at half its size (the
    generation resolution, halved)."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"edit source image must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    h, w = max(1, arr.shape[0] // 2), max(1, arr.shape[1] // 2)
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))


def template_prefix(task: str) -> str:
    """The part of the task's template before the prompt; its tokens are cropped off the hidden states."""
    _check_task(task)
    return PROMPT_TEMPLATES[task].split("{}")[0]


def _check_task(task: str) -> None:
    if task not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown task {task!r}; choose one of {list(PROMPT_TEMPLATES)}")


def _check_prompts(prompts: object) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single str (wrap it in a list)")
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is an empty list: need at least one prompt to encode")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must all be str; entries {bad} are not (e.g. {type(prompts[bad[0]]).__name__})")
    return list(prompts)


def _resolve(path: str | os.PathLike, subfolder: str | None, default_sub: str, marker: str) -> Path:
    """A component folder: ``path/subfolder``, else ``path/default_sub`` of a pipeline folder, else ``path``."""
    root = Path(path)
    if subfolder is not None:
        return root / subfolder
    if not (root / marker).exists() and (root / default_sub).is_dir():
        return root / default_sub
    return root


@dataclass
class TextEncoding:
    """Per-token text states padded to a fixed length; ``mask`` is True on real prompt tokens.

    Padded positions hold zeros, so an encoding does not depend on what else was in its batch.
    """

    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool
    lengths: torch.Tensor  # (B,) int64, number of True entries per row

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoding:
        # Only the embeddings change dtype: mask stays bool, lengths stay integer.
        return TextEncoding(
            embeds=self.embeds.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            lengths=self.lengths.to(device=device),
        )

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative lengths ``[0, l0, l0+l1, ...]`` (int32) for packed variable-length attention."""
        return torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0)).to(torch.int32)

    def __len__(self) -> int:
        return self.embeds.shape[0]


def _tokenizer_dir(model_dir: Path, tokenizer_path: str | os.PathLike | None, pipeline_sub: str) -> Path:
    """``tokenizer_path`` if given, else the pipeline folder's ``pipeline_sub`` beside the model's, else the model's."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    if (model_dir.parent / pipeline_sub).is_dir() and model_dir.name == _MODEL_SUBFOLDERS[pipeline_sub]:
        return model_dir.parent / pipeline_sub
    return model_dir


# tokenizer subfolder -> its model's subfolder in a diffusers pipeline folder
_MODEL_SUBFOLDERS = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2"}


class _FrozenTextModel:
    """A frozen (eval, no grad) transformers text model with its tokenizer and the device its inputs go to."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> Self:
        self.model.to(device)
        self.device = torch.device(device)
        return self


class QwenTextEncoder(_FrozenTextModel):
    """Qwen2.5-VL last hidden state with the Kandinsky 5 chat templates."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu",
                 image_processor: Any = None):
        super().__init__(model, tokenizer, device=device)
        self._prefix_len: dict[str, int] = {}
        self._image_processor = image_processor  # loaded on the first edit encoding when not given
        self._processor_dirs: tuple[Path, ...] = ()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        tokenizer_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> QwenTextEncoder:
        """Load from a local model folder or a diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``)."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        model_dir = _resolve(path, subfolder, "text_encoder", "config.json")
        tok_dir = _tokenizer_dir(model_dir, tokenizer_path, "tokenizer")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        # AutoTokenizer also reads the tokenizer files inside a Qwen2VLProcessor folder (real diffusers repos).
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        encoder = cls(model.to(device), tokenizer, device=device)
        encoder._processor_dirs = (tok_dir, model_dir)
        return encoder

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg).hidden_size

    @property
    def image_processor(self) -> Any:
        """The Qwen2.5-VL image processor: ``preprocessor_config.json`` of the tokenizer or model folder (a
        diffusers I2I folder keeps a Qwen2VLProcessor in ``tokenizer/``), else the Qwen2.5-VL defaults."""
        if self._image_processor is None:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            found = [d for d in self._processor_dirs if (d / "preprocessor_config.json").exists()]
            self._image_processor = (Qwen2VLImageProcessorPil.from_pretrained(found[0], local_files_only=True)
                                     if found else Qwen2VLImageProcessorPil())
        return self._image_processor

    def _vision(self, images: Sequence[np.ndarray]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Pixel patches + grids of the images (as given) and the number of ``<|image_pad|>`` tokens of each."""
        from PIL import Image

        proc = self.image_processor
        out = proc(images=[Image.fromarray(np.asarray(im)) for im in images], return_tensors="pt")
        merge = int(getattr(proc, "merge_size", 2))
        counts = [int(g.prod()) // merge**2 for g in out["image_grid_thw"]]
        return {"pixel_values": out["pixel_values"].to(self.device, self.dtype),
                "image_grid_thw": out["image_grid_thw"].to(self.device)}, counts

    def _ids(self, text: str) -> list[int]:
        # No BOS/EOS: Qwen adds none, and prefix and full text must be tokenised the same way for the crop.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefix_length(self, task: str = "video") -> int:
        """Number of template-prefix tokens cropped off (129/41/55/132 for the real Qwen2.5 tokenizer)."""
        _check_task(task)
        if task not in self._prefix_len:
            self._prefix_len[task] = len(self._ids(template_prefix(task)))
        return self._prefix_len[task]

    @torch.no_grad()
    def encode(
        self,
        prompts: list[str],
        task: str = "video",
        max_length: int | None = None,
        crop_start: int | None = None,
        images: Sequence[np.ndarray | None] | None = None,
    ) -> TextEncoding:
        """Encode prompts to ``TextEncoding(embeds (B, max_length, D), mask (B, max_length))``.

        Each prompt is formatted into the task template, truncated to ``crop_start + max_length`` tokens (as the
        official code does, so an over-long prompt loses its tail and the closing ``<|im_end|>``), run through the
        model, and the first ``crop_start`` hidden states (the template prefix) are dropped.

        ``images`` (task "edit" only): per prompt the source image as Qwen sees it (``edit_image_for_qwen``) or None;
        its vision tokens follow the (truncated) prompt and stay in the output, which then may be longer than
        ``max_length``.
        """
        prompts = _check_prompts(prompts)
        _check_task(task)
        if images is not None and (task != "edit" or len(images) != len(prompts)):
            raise ValueError(f"images= is for task 'edit' with one entry per prompt; got task {task!r}, "
                             f"{len(images)} images for {len(prompts)} prompts")
        max_length = DEFAULT_MAX_LENGTH[task] if max_length is None else int(max_length)
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        crop = self.prefix_length(task) if crop_start is None else int(crop_start)
        if crop < 0:
            raise ValueError(f"crop_start must be >= 0, got {crop_start}")

        template = PROMPT_TEMPLATES[task]
        prefix_ids = self._ids(template_prefix(task))[:crop]
        ids = []
        for p in prompts:
            row = self._ids(template.format(p))
            if crop_start is None and row[:crop] != prefix_ids:
                # BPE merged across the prefix/prompt boundary (e.g. a prompt starting with a newline).
                logger.warning("template prefix tokenised differently for prompt %r; crop may be off by a token", p)
            ids.append(row[: crop + max_length])
        vision: dict[str, torch.Tensor] = {}
        given = [i for i, im in enumerate(images or []) if im is not None]
        if given:
            vision, counts = self._vision([images[i] for i in given])  # type: ignore[index]
            for i, n in zip(given, counts):
                ids[i] = ids[i] + self._ids(VISION_START + IMAGE_PAD * n + VISION_END + IM_END)

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
        attn = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):  # right padding: real tokens keep positions 0..n-1
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attn[i, : len(row)] = 1

        # The base model (no LM head) gives the final normed hidden state == hidden_states[-1] of the full model.
        base = getattr(self.model, "model", self.model)
        out = base(input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device), use_cache=False,
                   **vision)
        hidden = out.last_hidden_state[:, crop:]
        mask = attn[:, crop:].to(self.device).bool()

        width = max(max_length, hidden.shape[1]) if vision else max_length  # vision tokens are never cut
        embeds = hidden.new_zeros((len(ids), width, hidden.shape[-1]))
        full_mask = torch.zeros((len(ids), width), dtype=torch.bool, device=self.device)
        n = min(width, hidden.shape[1])
        embeds[:, :n] = hidden[:, :n] * mask[:, :n, None]
        full_mask[:, :n] = mask[:, :n]
        return TextEncoding(embeds=embeds, mask=full_mask, lengths=full_mask.sum(1))


class ClipTextEncoder(_FrozenTextModel):
    """CLIP text model pooled output (``pooler_output``), prompts padded/truncated to 77 tokens."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        tokenizer_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> ClipTextEncoder:
        """Load from a local CLIP folder or a diffusers pipeline folder (``text_encoder_2/`` + ``tokenizer_2/``)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        model_dir = _resolve(path, subfolder, "text_encoder_2", "config.json")
        tok_dir = _tokenizer_dir(model_dir, tokenizer_path, "tokenizer_2")
        model = CLIPTextModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        return cls(model.to(device), tokenizer, device=device)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Pooled embeddings (B, hidden) of the raw prompts (no template)."""
        prompts = _check_prompts(prompts)
        inputs = self.tokenizer(
            prompts, max_length=CLIP_MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt"
        ).to(self.device)
        return self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output

"""Instruction captions of kept pairs (report §4.3 step 8: source + target image -> an editing instruction).

* "qwen2_5_vl": the local Qwen2.5-VL folder (``k5data.curation.vlm``, the captioner's loader) sees the source and
  the target side by side in one image (left = before, right = after) with ``EDIT_PROMPT``;
* "caption-diff" (offline default): where the pair differs (the changed region found by the overlap analysis) and
  the target's curated caption: "Change the <region> of the image so that it shows: <caption>". It names the
  region truthfully but not the change itself; production configures the VLM.
"""

from __future__ import annotations

import numpy as np

EDIT_PROMPT = ("The left half is an image before an edit, the right half the same image after it. Write one short "
               "imperative instruction that turns the left image into the right one (e.g. 'Add a red hat to the "
               "man.'). Answer with the instruction only.")


def side_by_side(source: np.ndarray, target: np.ndarray, height: int = 336) -> np.ndarray:
    import cv2

    def fit(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        return cv2.resize(rgb, (max(1, round(w * height / h)), height), interpolation=cv2.INTER_AREA)

    return np.ascontiguousarray(np.concatenate([fit(source), fit(target)], axis=1))


def region_name(box: tuple[float, float, float, float] | None) -> str:
    """Words for a changed box given as fractions (x0, y0, x1, y1) of the image."""
    if box is None:
        return "whole image"
    x0, y0, x1, y1 = box
    if (x1 - x0) * (y1 - y0) > 0.6:
        return "whole image"
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}".replace("middle ", "")


def caption_diff_instruction(box: tuple[float, float, float, float] | None, target_caption: str | None) -> str:
    caption = (target_caption or "").strip().rstrip(".")
    what = caption[0].lower() + caption[1:] if caption else "the edited scene"
    region = region_name(box)
    where = "the image" if region == "whole image" else f"the {region} of the image"
    return f"Change {where} so that it shows: {what}."


class InstructionWriter:
    def __init__(self, backend: str, model_path: str | None = None, max_new_tokens: int = 64) -> None:
        if backend not in ("caption-diff", "qwen2_5_vl"):
            raise ValueError(f"instruction_backend {backend!r} is not one of caption-diff, qwen2_5_vl")
        self.backend = backend
        self.vlm = None
        if backend == "qwen2_5_vl":
            from k5data.curation.vlm import load_vlm

            if not model_path:
                raise ValueError("instruction_backend qwen2_5_vl needs instruction_model_path (a local folder)")
            self.vlm = load_vlm(model_path, max_new_tokens)
        self.name = "caption-diff-v1" if self.vlm is None else f"qwen2_5_vl:{model_path}"

    def write(self, source: np.ndarray, target: np.ndarray, changed_box: tuple[float, float, float, float] | None,
              target_caption: str | None) -> str:
        if self.vlm is None:
            return caption_diff_instruction(changed_box, target_caption)
        return self.vlm.generate(EDIT_PROMPT, side_by_side(source, target))

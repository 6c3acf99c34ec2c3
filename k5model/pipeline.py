"""End-to-end generation: prompt -> text encoders -> CrossDiT Euler sampler -> VAE -> uint8 frames.

Loads a diffusers-layout Kandinsky 5 pipeline folder (model_index.json, transformer/, text_encoder/, tokenizer/,
text_encoder_2/, tokenizer_2/, vae/) with our own components. Differences from diffusers' pipelines, on purpose:
official time grid, official prompt crop and text padding mask, CFG branches batched into one forward, timestep in
fp32. I2V puts the clean first-frame latent into the condition channels (official semantics; diffusers 0.42.1 leaves
them zero and only sets the mask). Instruct editing (task ``i2i``: an image VAE and a ``visual_cond`` transformer, the
released editing checkpoint's layout) puts the source image's latent into the condition channels with mask ones and
shows Qwen2.5-VL the source in the edit template (both CFG branches, as the official and diffusers' I2I code); without
a source image the same model generates text-to-image (condition and mask zero, the image template).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from k5model.distill.settings import SamplingSettings, read_sampling_settings
from k5model.flow_matching import TextCondition
from k5model.media import save_media, to_uint8
from k5model.sampling import sample

DEFAULT_VIDEO_NEGATIVE = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)
DEFAULTS = {
    # task: (guidance, shift, height, width, num_frames)
    "t2v": (5.0, 10.0, 512, 768, 121),
    "i2v": (5.0, 10.0, 512, 768, 121),
    "t2i": (3.5, 3.0, 1024, 1024, None),
    "i2i": (3.5, 3.0, 1024, 1024, None),  # official k5_lite_i2i_sft_hd.yaml: guidance 3.5, 1024 px
}
REQUIRED = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")
VIDEO_VAES = ("AutoencoderKLHunyuanVideo",)
IMAGE_VAES = ("AutoencoderKL",)
NABLA_MULTIPLE = 128  # NABLA tiles are 8x8 latent patches = 128 px


def video_scale_factor(height: int, width: int) -> tuple[float, float, float]:
    """RoPE scale of the video models: (1, 2, 2) when both sides are within 480p range [480, 854] px, else the
    HD value (1, 3.16, 3.16) (same rule as diffusers' ``_get_scale_factor``)."""
    if 480 <= height <= 854 and 480 <= width <= 854:
        return (1.0, 2.0, 2.0)
    return (1.0, 3.16, 3.16)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _text_hidden_size(config: dict[str, Any]) -> int | None:
    # Qwen2.5-VL keeps the LM width under text_config (transformers 5) or at the top level (older files).
    return config.get("text_config", {}).get("hidden_size", config.get("hidden_size"))


def inspect_model_dir(model_dir: str | Path) -> dict[str, Any]:
    """Validate a pipeline folder without loading weights: components present, VAE kind, text widths matching the
    transformer. Returns {"task", "vae_class", "transformer_config"}; raises ValueError with the offending value."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ValueError(f"model dir {str(root)!r} does not exist or is not a folder")
    if not (root / "model_index.json").exists():
        raise ValueError(f"model dir {str(root)!r} has no model_index.json (not a diffusers pipeline folder)")
    index = _json(root / "model_index.json")
    missing = [c for c in REQUIRED if not (root / c).is_dir()]
    if missing:
        raise ValueError(f"model dir {str(root)!r} is missing component(s) {', '.join(missing)}")
    vae_class = (index.get("vae") or [None, None])[1] or _json(root / "vae" / "config.json").get("_class_name")
    if vae_class in VIDEO_VAES:
        task = "i2v" if "I2V" in str(index.get("_class_name", "")) else "t2v"
    elif vae_class in IMAGE_VAES:
        task = "t2i"
        if "I2I" in str(index.get("_class_name", "")) or _json(root / "transformer" / "config.json").get(
                "visual_cond") or _json(root / "transformer" / "config.json").get("instruct_type") == "channel":
            task = "i2i"
    else:
        raise ValueError(f"model dir {str(root)!r}: unsupported VAE class {vae_class!r}")
    tcfg = _json(root / "transformer" / "config.json")
    qwen = _text_hidden_size(_json(root / "text_encoder" / "config.json"))
    clip = _json(root / "text_encoder_2" / "config.json").get("hidden_size")
    if qwen is not None and tcfg.get("in_text_dim") != qwen:
        raise ValueError(f"mismatched checkpoint in {str(root)!r}: transformer in_text_dim={tcfg.get('in_text_dim')} "
                         f"but the Qwen text encoder hidden size is {qwen}")
    if clip is not None and tcfg.get("in_text_dim2") != clip:
        raise ValueError(f"mismatched checkpoint in {str(root)!r}: transformer in_text_dim2={tcfg.get('in_text_dim2')}"
                         f" but the CLIP text encoder hidden size is {clip}")
    if task == "i2v" and not tcfg.get("visual_cond"):
        raise ValueError(f"mismatched checkpoint in {str(root)!r}: I2V pipeline but the transformer has no visual_cond")
    return {"task": task, "vae_class": vae_class, "transformer_config": tcfg}


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 (F, H, W, 3); F = 1 for images
    latents: torch.Tensor  # fp32 (1, T, h, w, 16)
    timings: dict[str, float] = field(default_factory=dict)
    task: str = "t2v"
    fps: int = 24
    sampling: dict[str, Any] = field(default_factory=dict)  # steps, guidance, shift, grid, magcache actually used

    def save(self, path: str | Path) -> Path:
        return save_media(self.frames, path, fps=self.fps)


def _trim(cond: TextCondition, length: int) -> TextCondition:
    return TextCondition(cond.embeds[:, :length], cond.mask[:, :length], cond.pooled)


def _image_to_pixels(image: Any, height: int, width: int) -> torch.Tensor:
    """uint8 (H, W, 3) array or PIL image -> (1, 3, height, width) in [-1, 1], resized (cover) and centre-cropped."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"image must be uint8 (H, W, 3) or a PIL image, got {arr.dtype} {arr.shape}")
        pil = Image.fromarray(arr)
    scale = max(width / pil.width, height / pil.height)
    size = (max(width, round(pil.width * scale)), max(height, round(pil.height * scale)))
    pil = pil.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    arr = np.asarray(pil.crop((left, top, left + width, top + height)), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)[None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class K5Pipeline:
    """Kandinsky 5 generation with our CrossDiT, encoders and sampler."""

    def __init__(self, transformer, text_encoder, clip_encoder, vae, *, task: str, device: torch.device,
                 sampling: SamplingSettings | None = None):
        self.transformer = transformer.eval().requires_grad_(False)
        self.sampling = sampling  # the folder's own sampling settings (distilled models, MagCache), if any
        self.text_encoder = text_encoder
        self.clip_encoder = clip_encoder
        self.vae = vae
        self.task = task
        self.device = device

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> K5Pipeline:
        """Load a diffusers-layout Kandinsky 5 pipeline folder. ``dtype`` (default fp32 on CPU, bf16 on GPU) is the
        transformer/text-encoder precision; the transformer keeps its time path and modulations in fp32."""
        from k5model.crossdit import CrossDiT
        from k5model.encoders import ClipTextEncoder, ImageVAE, QwenTextEncoder, VideoVAE

        info = inspect_model_dir(model_dir)
        root = Path(model_dir)
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        transformer = CrossDiT.from_pretrained(root / "transformer", device=device)
        if dtype != torch.float32:
            transformer.to_mixed_precision(dtype)
        text_encoder = QwenTextEncoder.from_pretrained(root, device=device, dtype=dtype)
        clip_encoder = ClipTextEncoder.from_pretrained(root, device=device, dtype=dtype)
        if info["task"] in ("t2i", "i2i"):
            vae = ImageVAE.from_pretrained(root, device=device, dtype=dtype)
        else:
            # The official code decodes video in fp16 on GPU; fp16 is slow or unsupported for convs on CPU.
            vae = VideoVAE.from_pretrained(root, device=device, dtype=torch.float16 if device.type == "cuda" else dtype)
        if text_encoder.hidden_size != transformer.config.in_text_dim:
            raise ValueError(f"mismatched checkpoint: transformer in_text_dim={transformer.config.in_text_dim} but the "
                             f"text encoder hidden size is {text_encoder.hidden_size}")
        return cls(transformer, text_encoder, clip_encoder, vae, task=info["task"], device=device,
                   sampling=read_sampling_settings(root))

    @property
    def is_video(self) -> bool:
        return self.task in ("t2v", "i2v")

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must divide into whole latent patches: VAE factor (8) × patch (2) = 16; NABLA needs whole
        8×8-patch tiles = 128."""
        if self.transformer.config.attention_type == "nabla":
            return NABLA_MULTIPLE
        return self.vae.spatial_compression * int(self.transformer.config.patch_size[1])

    def check_inputs(
        self, prompt: str, height: int, width: int, num_frames: int | None, image: Any
    ) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % m:
                raise ValueError(f"{name}={v} is not supported: it must be a positive multiple of {m}")
        if self.is_video:
            if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
                raise ValueError(f"num_frames={num_frames} is not supported: video needs 4k+1 frames (5, 9, ..., 121)")
        elif num_frames not in (None, 1):
            raise ValueError(f"num_frames={num_frames} given for an image model; leave it unset")
        if self.task == "i2v" and image is None:
            raise ValueError("an image-to-video model needs image= (the first frame)")
        if self.task not in ("i2v", "i2i") and image is not None:
            raise ValueError(f"image= was given but this is a {self.task} model, not image-to-video or editing")

    def encode_text(self, prompt: str, source: np.ndarray | None = None) -> TextCondition:
        """Qwen + CLIP condition of ``prompt``; ``source`` (uint8 (H, W, 3) at the generation size): the edit
        template with the source image shown to Qwen at half size."""
        task = {"t2v": "video", "i2v": "i2v", "t2i": "image", "i2i": "image"}[self.task]
        if source is not None:
            from k5model.encoders.text import edit_image_for_qwen

            enc = self.text_encoder.encode([prompt], task="edit", images=[edit_image_for_qwen(source)])
        else:
            enc = self.text_encoder.encode([prompt], task=task)
        pooled = self.clip_encoder.encode([prompt])
        return TextCondition(enc.embeds, enc.mask, pooled)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        seed: int = 0,
        image: Any = None,
        progress: bool = True,
        magcache: bool | None = None,
    ) -> GenerationResult:
        """Generate one video (frames 4k+1) or image. Defaults by task: video 512×768, 121 frames, guidance 5.0,
        shift 10; image 1024×1024, guidance 3.5, shift 3; 50 steps. ``guidance_scale=1`` skips the negative branch.
        A folder with ``sampling_config.json`` overrides the step count, guidance and shift defaults; its segment
        boundaries are the grid when ``num_steps`` is its own, and its MagCache calibration is used unless
        ``magcache=False`` (``magcache=True`` without a calibration is an error)."""
        d_guid, d_shift, d_h, d_w, d_frames = DEFAULTS[self.task]
        own = self.sampling
        if own is not None:
            d_guid, d_shift = own.guidance_scale, own.shift
        num_steps = (own.num_steps if own is not None else 50) if num_steps is None else num_steps
        height = d_h if height is None else height
        width = d_w if width is None else width
        num_frames = d_frames if (num_frames is None and self.is_video) else num_frames
        guidance_scale = d_guid if guidance_scale is None else float(guidance_scale)
        shift = d_shift if shift is None else float(shift)
        self.check_inputs(prompt, height, width, num_frames, image)
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        if negative_prompt is None:
            negative_prompt = DEFAULT_VIDEO_NEGATIVE if self.is_video else ""

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        first = edit = source = None
        if image is not None:
            pixels = _image_to_pixels(image, height, width)
            if self.task == "i2i":  # the source as uint8 at the generation size: what the VAE and Qwen see
                source = to_uint8(pixels[0].permute(1, 2, 0)[None])[0]
        cond = self.encode_text(prompt, source)
        uncond = self.encode_text(negative_prompt, source) if guidance_scale != 1.0 else None
        # Drop padding columns no prompt uses: masked tokens change nothing, so this only saves compute.
        used = int(max(c.mask.sum(1).max().item() for c in (cond, uncond) if c is not None))
        cond = _trim(cond, max(used, 1))
        uncond = _trim(uncond, max(used, 1)) if uncond is not None else None

        s = self.vae.spatial_compression
        frames_latent = (num_frames - 1) // 4 + 1 if self.is_video else 1
        shape = (1, frames_latent, height // s, width // s, int(self.transformer.config.in_visual_dim))
        if image is not None:
            latent = self.vae.encode(pixels.to(self.device)).float()
            first, edit = (latent, None) if self.task == "i2v" else (None, latent.reshape(1, 1, *shape[2:]))
        _sync(self.device)  # GPU work is asynchronous: each phase's time ends when its kernels have
        timings["encode_s"] = time.perf_counter() - t0

        timesteps = own.timesteps if own is not None and num_steps == own.num_steps else None
        if magcache and (own is None or own.magcache is None):
            raise ValueError("magcache=True but this pipeline folder has no MagCache calibration "
                             "(materialize magcache_calibration for it)")
        cache = own.build_magcache(num_steps) if own is not None and magcache is not False else None
        t1 = time.perf_counter()
        latents = sample(
            self.transformer, latent_shape=shape, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
            num_steps=num_steps, shift=shift, scale_factor=video_scale_factor(height, width) if self.is_video
            else (1.0, 1.0, 1.0), seed=seed, first_frame_latent=first, edit_latent=edit, progress=progress,
            timesteps=timesteps, magcache=cache,
        )
        _sync(self.device)
        timings["sample_s"] = time.perf_counter() - t1
        if cache is not None:
            timings["magcache_skipped"] = float(cache.skipped)

        t2 = time.perf_counter()
        pixels = self.vae.decode(latents)  # stays on the device: to_uint8 converts there, then copies
        # video (1, 3, F, H, W) / image (1, 3, H, W) -> (F, H, W, 3)
        pixels = pixels[0].permute(1, 2, 3, 0) if pixels.ndim == 5 else pixels[0].permute(1, 2, 0)[None]
        frames = to_uint8(pixels)
        timings["decode_s"] = time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - t0
        sampling = {"num_steps": num_steps, "guidance_scale": guidance_scale, "shift": shift,
                    "grid": "segment_boundaries" if timesteps is not None else "shifted",
                    "magcache": cache is not None}
        return GenerationResult(frames=frames, latents=latents.cpu(), timings=timings, task=self.task,
                                sampling=sampling)

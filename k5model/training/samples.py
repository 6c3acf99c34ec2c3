"""Sample generations during training: a trainer callback that, every N steps, generates from fixed validation
prompts with the current EMA weights and the stage's text encoders / VAE, and writes the media files.

Layout: ``<out>/step_<N>/<i>.mp4`` (video stages) or ``.png`` (image-only stages) and ``prompts.json``; each step folder
appears complete at once (written under a temporary name, then renamed), so a tracker that logs it never sees half.

The text encoders are loaded once, on the first sampling step, encode the fixed prompts (and the negative prompt) and
are freed: only their outputs stay in memory for the rest of the stage. With ``cache_dir`` the encodings are also kept
on disk, keyed by the prompts and the encoder files, so the next stage of a chain skips loading the encoders (a 7B
Qwen in production, most of a demo stage's sampling time on CPU). The VAE stays loaded. Pure PyTorch: tracking code
(MLflow) picks the folders up from outside.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from k5model.flow_matching import TextCondition
from k5model.pipeline import DEFAULT_VIDEO_NEGATIVE, K5Pipeline, inspect_model_dir

# Used when no prompt file is given (run.py --sample-prompts); the demo passes MovieGen / PartiPrompts lines instead.
DEFAULT_PROMPTS = (
    "A corgi running on the beach, waves crashing, golden hour lighting, slow motion.",
    "A drone shot of a mountain lake at sunrise, mist over the water, camera slowly moving forward.",
)


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a text file (one prompt a line); ``limit`` keeps the first N."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"validation prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"validation prompt file {path} holds no prompt")
    return prompts[:limit] if limit is not None else prompts


class _CachedTextPipeline(K5Pipeline):
    """K5Pipeline whose text conditions come from a cache filled once (the encoders are not kept)."""

    def __init__(self, transformer: torch.nn.Module, vae: Any, *, task: str, device: torch.device,
                 conditions: dict[str, TextCondition]):
        super().__init__(transformer, None, None, vae, task=task, device=device)
        self.conditions = conditions

    def encode_text(self, prompt: str, source: Any = None) -> TextCondition:
        return self.conditions[prompt]  # text-to-video validation prompts: no source image (K5Pipeline passes None)


class SampleGenerator:
    """Trainer callback: generate ``prompts`` with the EMA weights at every multiple of ``every`` and at
    ``final_step``. Every rank must run it (gathering the sharded EMA is a collective); rank 0 generates and writes.

    ``pipeline_dir``: a diffusers-layout Kandinsky 5 pipeline folder whose ``text_encoder*``/``tokenizer*`` and ``vae``
    are used (its transformer is not). Sizes default to the stage's most likely resolution and its clip length."""

    def __init__(self, trainer: Any, pipeline_dir: str | Path, out_dir: str | Path, *, every: int,
                 prompts: Sequence[str] = DEFAULT_PROMPTS, final_step: int | None = None, num_steps: int = 25,
                 guidance_scale: float = 5.0, seed: int = 0, rank: int = 0, cache_dir: str | Path | None = None):
        if every < 0:
            raise ValueError(f"sample every {every} steps: must be >= 0 (0 = only at the final step)")
        if not prompts:
            raise ValueError("sample generation needs at least one validation prompt")
        info = inspect_model_dir(pipeline_dir)  # raises ValueError naming a missing component / bad folder
        cfg = trainer.model.config
        text_dim = info["transformer_config"].get("in_text_dim")
        if text_dim is not None and text_dim != cfg.in_text_dim:
            raise ValueError(f"sample pipeline {pipeline_dir}: its text encoder is for in_text_dim={text_dim}, the "
                             f"stage's model has in_text_dim={cfg.in_text_dim} (preset {trainer.stage.model_preset})")
        self.trainer, self.rank = trainer, rank
        self.pipeline_dir, self.out_dir = Path(pipeline_dir), Path(out_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.every, self.final_step = every, final_step
        self.prompts = list(prompts)
        self.num_steps, self.guidance_scale, self.seed = num_steps, guidance_scale, seed
        self.video_vae = info["task"] != "t2i"
        stage = trainer.stage
        self.is_video = bool({"t2v", "i2v"} & set(stage.tasks))  # t2i and edit stages are image-only
        if self.is_video and not self.video_vae:
            raise ValueError(f"stage {stage.name} trains video but {pipeline_dir} has an image VAE; use a T2V folder")
        key = max(stage.resolutions, key=lambda k: stage.resolutions[k])  # first of the most likely resolutions
        self.latent_hw = stage.parse_resolution(key)
        self.latent_frames = stage.frames if self.is_video else 1
        self._vae: Any = None
        self._conditions: dict[str, TextCondition] | None = None
        self.written: dict[int, Path] = {}

    def _due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.final_step

    def _cache_key(self, texts: list[str], task: str, dtype: torch.dtype) -> str:
        files = []
        for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            for f in sorted((self.pipeline_dir / sub).glob("*")):
                if f.is_file():
                    st = f.stat()
                    files.append((sub, f.name, st.st_size, st.st_mtime_ns))
        blob = json.dumps({"texts": texts, "task": task, "dtype": str(dtype), "files": files,
                           "pipeline": str(self.pipeline_dir.resolve())})
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _encode(self, texts: list[str], task: str, device: torch.device,
                dtype: torch.dtype) -> dict[str, TextCondition]:
        from k5model.encoders import ClipTextEncoder, QwenTextEncoder

        path = self.cache_dir / f"{self._cache_key(texts, task, dtype)}.pt" if self.cache_dir else None
        if path is not None and path.is_file():
            stored = torch.load(path, weights_only=True)
            return {t: TextCondition(*(x.to(device) for x in stored[t])) for t in texts}
        qwen = QwenTextEncoder.from_pretrained(self.pipeline_dir, device=device, dtype=dtype)
        clip = ClipTextEncoder.from_pretrained(self.pipeline_dir, device=device, dtype=dtype)
        conditions = {}
        with torch.no_grad():
            for text in texts:
                enc = qwen.encode([text], task=task)
                conditions[text] = TextCondition(enc.embeds, enc.mask, clip.encode([text]))
        del qwen, clip  # only the encodings are needed from now on
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save({t: tuple(x.cpu() for x in (c.embeds, c.mask, c.pooled)) for t, c in conditions.items()}, tmp)
            tmp.replace(path)  # atomic: a concurrent stage reads either nothing or the whole file
        return conditions

    def _load(self, device: torch.device, dtype: torch.dtype) -> None:
        from k5model.encoders import ImageVAE, VideoVAE

        negative = DEFAULT_VIDEO_NEGATIVE if self.is_video else ""
        conditions = self._encode(list(dict.fromkeys([*self.prompts, negative])),
                                  "video" if self.is_video else "image", device, dtype)
        vae_cls = VideoVAE if self.video_vae else ImageVAE
        vae_dtype = torch.float16 if device.type == "cuda" and self.video_vae else torch.float32
        self._vae = vae_cls.from_pretrained(self.pipeline_dir, device=device, dtype=vae_dtype)
        self._conditions = conditions

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self._due(step) or step in self.written:
            return
        ema = self.trainer.ema.full_state_dict()  # collective: every rank gathers
        if self.rank != 0:
            return
        self.written[step] = self.generate(step, ema)
        metrics["samples"] = float(len(self.prompts))

    @torch.no_grad()
    def generate(self, step: int, ema_state: dict[str, torch.Tensor]) -> Path:
        """Generate every prompt with ``ema_state`` into ``<out>/step_<step>``; returns that folder."""
        from k5model.crossdit import CrossDiT

        device = self.trainer.device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if self._conditions is None:
            self._load(device, dtype)
        model = CrossDiT(self.trainer.model.config)
        model.load_state_dict(ema_state, strict=True)
        model.to(device)
        if dtype != torch.float32:
            model.to_mixed_precision(dtype)
        pipe = _CachedTextPipeline(model, self._vae, task="t2v" if self.is_video else "t2i", device=device,
                                   conditions=self._conditions)
        s = self._vae.spatial_compression
        height, width = self.latent_hw[0] * s, self.latent_hw[1] * s
        frames = (self.latent_frames - 1) * self._vae.temporal_compression + 1 if self.is_video else None
        final = self.out_dir / f"step_{step}"
        tmp = self.out_dir / f".step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        records = []
        for i, prompt in enumerate(self.prompts):
            result = pipe.generate(prompt, height=height, width=width, num_frames=frames, num_steps=self.num_steps,
                                   guidance_scale=self.guidance_scale, seed=self.seed + i, progress=False)
            name = f"{i:02d}.{'mp4' if self.is_video else 'png'}"
            result.save(tmp / name)
            records.append({"file": name, "prompt": prompt, "seed": self.seed + i, "height": height, "width": width,
                            "frames": int(result.frames.shape[0]), "seconds": round(result.timings["total_s"], 3)})
        (tmp / "prompts.json").write_text(json.dumps({"step": step, "num_steps": self.num_steps,
                                                       "guidance_scale": self.guidance_scale, "samples": records},
                                                      indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        del model, pipe
        return final

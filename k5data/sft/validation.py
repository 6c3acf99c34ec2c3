"""Validation of SFT fine-tunes and soups (report §6.4: a domain fine-tune stops when its generations start showing
artifacts; we add the measurable half of that rule).

``validation_loss``: the flow-matching loss of a transformer on fixed validation latents at fixed timesteps and fixed
noise (seeded per item and timestep), so two checkpoints or two models are compared on exactly the same draws. The
caption is each item's first variant (stable across calls). ``artifact_score``: an automatic proxy on decoded sample
frames (clipped-pixel share + high-frequency energy share); ``EarlyStop`` combines both with a human verdict file, the
hook for the human check the report describes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from k5data.latents.shards import Store
from k5data.sft.dataset import read_samples
from k5model.training.caption_variants import caption_choices

TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed flow-matching times of the validation loss


def validation_loss(transformer: str | os.PathLike, text_encoders: str | os.PathLike, store: Store,
                    prefixes: list[str], *, timesteps: tuple[float, ...] = TIMESTEPS, seed: int = 0,
                    model: Any = None, text: Any = None) -> float:
    """Mean flow-matching loss of ``transformer`` (a transformer or pipeline folder) over every sample under
    ``prefixes`` (ids in sorted order) and ``timesteps``, noise seeded by (seed, item position, timestep position).
    ``model`` / ``text``: already loaded CrossDiT / TextEncoders to reuse (the soup evaluates several models)."""
    import torch

    from k5data.loading.training_source import TextEncoders
    from k5model.crossdit import CrossDiT
    from k5model.flow_matching import flow_matching_loss_packed

    samples = {}
    for prefix in prefixes:
        samples.update(read_samples(store, prefix))
    if not samples:
        raise ValueError(f"no validation samples under {prefixes}")
    ids = sorted(samples)
    model = model if model is not None else CrossDiT.from_pretrained(str(transformer)).eval()
    text = text if text is not None else TextEncoders.from_pretrained(text_encoders)
    tasks = ["t2i" if samples[i].latent.shape[0] == 1 else "t2v" for i in ids]
    with torch.inference_mode():
        embeds, pooled = text.encode([caption_choices(samples[i].caption)[0] for i in ids], tasks)
        x0 = [torch.from_numpy(np.asarray(samples[i].latent, dtype=np.float32)) for i in ids]
        total = 0.0
        for k, t in enumerate(timesteps):
            noise = [torch.randn(x.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + j * 101 + k))
                     for j, x in enumerate(x0)]
            loss, _ = flow_matching_loss_packed(model, x0, embeds, pooled, t=torch.full((len(ids),), float(t)),
                                                noise=noise, dtype=torch.float32)
            total += float(loss)
    return total / len(timesteps)


def artifact_score(frames: np.ndarray) -> float:
    """Artifact proxy of uint8 frames (T, H, W, 3) or (H, W, 3), in [0, 1]: the mean of the share of clipped pixels
    (0 or 255 in a channel: blown highlights, crushed shadows, colour aberration) and the share of the image's
    energy in its highest spatial frequencies (noise, geometric breakup)."""
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    clipped = float(((x <= 0) | (x >= 255)).mean())
    gray = x.mean(axis=-1)
    lap = np.abs(4 * gray[:, 1:-1, 1:-1] - gray[:, :-2, 1:-1] - gray[:, 2:, 1:-1] - gray[:, 1:-1, :-2]
                 - gray[:, 1:-1, 2:])
    high = float(lap.mean() / (4 * 255.0))
    return 0.5 * clipped + 0.5 * min(1.0, 4 * high)


def read_sample_frames(folder: str | os.PathLike) -> list[np.ndarray]:
    """Decoded frames of every sample file in a training samples folder (``step_<N>/`` of .png / .mp4)."""
    from k5model.media import read_video

    out = []
    for f in sorted(Path(folder).iterdir()):
        if f.suffix == ".png":
            from PIL import Image

            out.append(np.asarray(Image.open(f).convert("RGB")))
        elif f.suffix == ".mp4":
            out.append(read_video(f))
    return out


@dataclass(kw_only=True)
class EarlyStop:
    """When a fine-tune stops: validation loss not improving by ``min_delta`` for ``patience`` evaluations, the
    artifact proxy rising above ``artifact_tolerance`` x the starting model's, or a human verdict of artifacts."""

    patience: int = 1
    """Evaluations without improvement tolerated before stopping."""
    min_delta: float = 0.0
    """Improvement that counts (absolute loss)."""
    artifact_tolerance: float = 1.5
    """Stop once the samples' artifact score exceeds this multiple of the starting model's."""
    history: list[dict[str, Any]] = field(default_factory=list)

    def best(self) -> dict[str, Any]:
        """The evaluation with the lowest validation loss among those without artifacts."""
        ok = [h for h in self.history if not h.get("artifacts")] or self.history
        return min(ok, key=lambda h: h["val_loss"])

    def update(self, step: int, val_loss: float, artifact: float | None, baseline_artifact: float | None,
               human_verdict: str | None = None) -> str | None:
        """Record one evaluation; the reason to stop, or None to continue."""
        artifacts = (human_verdict == "artifacts" or (artifact is not None and baseline_artifact is not None
                                                       and artifact > self.artifact_tolerance * max(
                                                           baseline_artifact, 1e-6)))
        self.history.append({"step": step, "val_loss": val_loss, "artifact_score": artifact,
                             "human_verdict": human_verdict, "artifacts": artifacts})
        if artifacts:
            return ("human check found artifacts" if human_verdict == "artifacts" else
                    f"artifact score {artifact:.4f} > {self.artifact_tolerance} x start {baseline_artifact:.4f}")
        losses = [h["val_loss"] for h in self.history]
        best_at = int(np.argmin(losses))
        if len(losses) - 1 - best_at >= self.patience and losses[-1] > losses[best_at] - self.min_delta:
            return f"validation loss has not improved for {self.patience} evaluation(s) (best at step " \
                   f"{self.history[best_at]['step']}: {losses[best_at]:.5f})"
        return None


def human_verdict(path: str | os.PathLike, step: int) -> str | None:
    """The human check's verdict for ``step`` from a JSON file ``{"<step>": "ok" | "artifacts"}`` (None: not
    judged). The annotation app or a reviewer writes it; a fine-tune reads it at every evaluation."""
    p = Path(path)
    if not p.is_file():
        return None
    verdict = json.loads(p.read_text()).get(str(step))
    if verdict not in (None, "ok", "artifacts"):
        raise ValueError(f"{p}: verdict for step {step} is {verdict!r}; write 'ok' or 'artifacts'")
    return verdict

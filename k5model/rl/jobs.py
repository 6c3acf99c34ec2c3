"""The typed job specs of RL post-training (report §6.6), one per training job, in the shape of ``TrainJob``:
kw-only dataclasses, a docstring per field, JSON in and out. ``python -m orchestration.pipes_rl --kind reward|draft
--job JSON`` (the Pipes side, a subprocess or a GPU pod) and ``k5 rl reward|draft`` (the CLI) run the same spec.

The reward pairs (``reward_pairs`` asset, :data:`PAIR_COLUMNS`) are one Parquet table: one row per ordered pair,
both orders of every pair, with the image files, which model made each image and which split the item is in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# torch, numpy and PIL are imported where used, so the CLI's option generation from these specs stays light

# pretrain < sft < real (report §6.6: the heuristic order, no human labels)
SOURCES_WORST_TO_BEST = ("pretrain", "sft", "real")
PAIR_COLUMNS = ("item_id", "prompt", "split", "first_path", "second_path", "first_source", "second_source", "label")


class _JsonJob:
    """JSON round trip shared by the RL job specs."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str | os.PathLike):
        """The spec from inline JSON or a JSON file; unknown fields are refused with their names."""
        raw = json.loads(Path(text).read_text() if not str(text).lstrip().startswith("{") else str(text))
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**raw)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore


@dataclass(frozen=True, kw_only=True)
class RewardTrainJob(_JsonJob):
    """Training of the relative reward model on the heuristic pairs."""

    pairs: str
    """Parquet of the ``reward_pairs`` asset (columns :data:`PAIR_COLUMNS`)."""
    base_model: str
    """Qwen2.5-VL folder the reward model starts from (production: Qwen/Qwen2.5-VL-7B-Instruct)."""
    out: str
    """Run folder: ``checkpoints/step_<N>/``, ``selected/`` (the σ-chosen one), ``evals.json``, ``summary.json``."""
    steps: int = 20
    """Optimizer steps."""
    batch: int = 4
    """(better, worse) pairs per step; each is trained in both orders."""
    lr: float = 1e-4
    """AdamW learning rate."""
    eval_every: int = 5
    """Steps between validations (each writes a checkpoint); the last step is always evaluated."""
    accuracy_tolerance: float | None = None
    """σ criterion: candidates are the evaluations within this of the best swap-averaged validation accuracy; None:
    one binomial standard error of that accuracy over the validation pairs (the one-standard-error rule)."""
    seed: int = 0
    """Seed of the batch order."""
    device: str = "cpu"
    """Torch device."""
    dtype: str = "float32"
    """Weights' dtype: float32 (CPU, tests) or bfloat16 (GPU; the margin is still computed in fp32)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.eval_every < 1:
            raise ValueError(f"steps, batch and eval_every must be >= 1, got {self.steps}, {self.batch}, "
                             f"{self.eval_every}")


@dataclass(frozen=True, kw_only=True)
class DraftTrainJob(_JsonJob):
    """DRaFT-K from the SFT model against the trained reward model (report §6.6)."""

    policy: str
    """Pipeline folder the policy starts from (the SFT soup); its transformer is also the frozen KL anchor."""
    reward_model: str
    """The reward model folder (``reward_model`` asset: the σ-chosen checkpoint)."""
    pairs: str
    """Reward pairs Parquet: train-split prompts and real images drive training, val-split ones are the fixed
    held-out evaluation set."""
    out: str
    """Run folder: ``transformer/`` (the RL policy), ``pipeline/``, ``history.json``, ``samples/step_<N>/``."""
    steps: int = 10
    """Policy updates."""
    batch: int = 1
    """Prompts per update (gradients accumulated one prompt at a time)."""
    lr: float = 1e-5
    """AdamW learning rate (fp32 master weights)."""
    num_steps: int = 50
    """Sampler steps N."""
    k: int = 10
    """Last sampler steps back-propagated through (report: 10 for images)."""
    beta_kl: float = 2e-2
    """Weight of the KL anchor (report: 2e-2)."""
    guidance_scale: float = 5.0
    """CFG weight of the rollouts; the unconditional branch gets no gradient."""
    height: int = 1024
    """Generated height in pixels."""
    width: int = 1024
    """Generated width in pixels."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    eval_every: int = 5
    """Steps between held-out evaluations (reward, KL, image statistics); step 0 and the last are always evaluated."""
    sample_every: int = 5
    """Steps between sample grids of the held-out prompts (written with the evaluation)."""
    checkpoint_steps: bool = True
    """Activation checkpointing of the K grad steps."""
    offload_to_cpu: bool = False
    """Keep the saved step inputs in host memory (GPU memory plan for large K / video)."""
    seed: int = 0
    """Seed of the training noise; held-out noise uses fixed seeds 10_000 + i."""
    device: str = "cpu"
    """Torch device."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.eval_every < 1 or self.sample_every < 1:
            raise ValueError("steps, batch, eval_every and sample_every must be >= 1")
        if not 1 <= self.k <= self.num_steps:
            raise ValueError(f"need 1 <= k <= num_steps, got k={self.k}, num_steps={self.num_steps}")


def read_pairs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The reward pairs as row dicts, image paths resolved against the table's folder (the asset writes them
    relative); refuses a table without the :data:`PAIR_COLUMNS`."""
    import pandas as pd

    table = pd.read_parquet(path)
    missing = [c for c in PAIR_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks reward pair columns {missing}; materialize reward_pairs again")
    folder = Path(path).parent
    for column in ("first_path", "second_path"):
        table[column] = [str(folder / p) for p in table[column]]  # an absolute p stays itself under "/"
    return table.to_dict("records")


def better_worse(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The (better, worse)-ordered rows of one split (label 1); the swapped order is their mirror."""
    return [r for r in rows if r["split"] == split and int(r["label"]) == 1]


def load_image_tensor(path: str | os.PathLike):
    """An image file -> (3, H, W) float32 tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def save_image_tensor(img, path: str | os.PathLike) -> Path:
    """(3, H, W) tensor in [-1, 1] -> PNG."""
    from PIL import Image

    arr = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return Path(path)

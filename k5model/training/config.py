"""Typed configuration of one training stage (torchtitan style: plain dataclasses, no dict soup)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TASKS = ("t2i", "t2v", "i2v", "edit")  # edit: instruct editing (report §6.3.1), image pairs only
ATTENTION_KINDS = ("regular", "nabla")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and global grad-norm clipping (betas/eps of the report's recipe)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError(f"invalid optimiser config {self}")


@dataclass
class StageConfig:
    """One stage of the training lifecycle (pre-train at a resolution, fine-tune, ...).

    ``resolutions`` maps "HxW" in latent voxels to a sampling probability; ``tasks`` maps t2i/t2v/i2v/edit to one.
    ``parent`` names the stage whose final (EMA or raw) weights initialise this one.
    """

    name: str
    steps: int
    batch: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    resolutions: dict[str, float] = field(default_factory=lambda: {"4x4": 1.0})
    tasks: dict[str, float] = field(default_factory=lambda: {"t2v": 1.0})
    frames: int = 2  # latent frames of a video sample (t2i samples have 1)
    attention: str = "regular"
    ema_decay: float = 0.9999
    uncond_prob: float = 0.1
    parent: str | None = None
    seed: int = 0
    model_preset: str = "tiny"
    timestep_shift: float = 1.0
    timestep_scheme: str = "uniform"
    bf16: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; use {TASKS}")
        for name, probs in (("resolutions", self.resolutions), ("tasks", self.tasks)):
            if not probs or any(p < 0 for p in probs.values()) or abs(sum(probs.values()) - 1.0) > 1e-6:
                raise ValueError(f"{name} probabilities must be non-negative and sum to 1, got {probs}")
        for key in self.resolutions:
            self.parse_resolution(key)
        if not 0.0 <= self.uncond_prob <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("uncond_prob must be in [0, 1] and ema_decay in [0, 1)")

    @staticmethod
    def parse_resolution(key: str) -> tuple[int, int]:
        try:
            h, w = (int(v) for v in key.lower().split("x"))
        except ValueError as err:
            raise ValueError(f"resolution {key!r} is not 'HxW'") from err
        return h, w

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                           grad_clip=self.grad_clip)

    def replace(self, **changes: Any) -> StageConfig:
        return dataclasses.replace(self, **changes)


# Only the CPU demo stage is defined here; the report's Table 4 stages are not encoded yet.
STAGES: dict[str, StageConfig] = {
    "tiny_demo": StageConfig(
        name="tiny_demo", steps=12, batch=2, lr=1e-3, weight_decay=0.01, warmup_steps=4,
        resolutions={"4x4": 0.5, "4x6": 0.5}, tasks={"t2i": 0.3, "t2v": 0.4, "i2v": 0.3},
        ema_decay=0.9, uncond_prob=0.1, seed=0, model_preset="tiny",
    ),
}


def get_stage(name: str, **overrides: Any) -> StageConfig:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
    return STAGES[name].replace(**overrides)

"""Classifier-free guidance distillation (report §6.5; Meng et al. 2023): the student learns the teacher's guided
velocity v_u + w·(v_c − v_u), w = 5.0, with the null (empty) prompt as the unconditional branch, so it samples with
``guidance_scale = 1`` in one forward per step (100 → 50 NFE).

The student is a copy of the teacher with the same architecture and key names — no guidance embedding, like the
official ``nocfg`` checkpoints — so every loader (ours, diffusers) reads it unchanged. The teacher is frozen; both see
the same noisy latents x_t = (1 − t)·x0 + t·ε at times drawn on the model's shifted schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from k5model.distill.common import DistillSet, model_input, optimise
from k5model.flow_matching import TextCondition, expand_batch, noise_latents, predict_velocity, sample_timesteps
from k5model.sampling import guided_velocity


@dataclass(frozen=True, kw_only=True)
class CFGDistillConfig:
    """One CFG-distillation run."""

    guidance_scale: float = 5.0
    """The teacher's guidance the student absorbs (report: 5.0)."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 4
    """Samples per step."""
    lr: float = 1e-5
    """AdamW learning rate (demo scale uses a larger one: tiny models, few steps)."""
    shift: float = 10.0
    """Training times are U(0, 1) shifted like the sampling grid, so the student learns where it is sampled."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    seed: int = 0
    """Seeds the batch, noise and time draws (re-runs are identical)."""


@torch.no_grad()
def guided_target(teacher: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: TextCondition,
                  null: TextCondition, guidance_scale: float) -> torch.Tensor:
    """The teacher's guided velocity at (x_t, t): two forwards (cond, null prompt)."""
    null = expand_batch(null, x_t.shape[0])
    return guided_velocity(teacher, model_input(teacher, x_t), t, cond, guidance_scale, batched_cfg=False,
                           uncond=null)


def cfg_distill_loss(student: nn.Module, teacher: nn.Module, x0: torch.Tensor, noise: torch.Tensor,
                     t: torch.Tensor, cond: TextCondition, null: TextCondition, guidance_scale: float) -> torch.Tensor:
    """MSE between the student's conditional velocity and the teacher's guided velocity at the same x_t."""
    x_t = noise_latents(x0, noise, t)
    target = guided_target(teacher, x_t, t, cond, null, guidance_scale)
    return F.mse_loss(predict_velocity(student, model_input(student, x_t), cond, t), target)


def train_cfg_distill(student: nn.Module, teacher: nn.Module, data: DistillSet, null: TextCondition,
                      config: CFGDistillConfig, on_step: Callable[[int, dict[str, float]], None] | None = None
                      ) -> list[dict[str, float]]:
    """Train ``student`` (initialised from the teacher's weights) in place; returns the per-step metrics."""
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the teacher must be frozen (eval mode, requires_grad False); use distill.common.frozen_copy")
    device = next(student.parameters()).device
    null = TextCondition(*(None if x is None else x.to(device) for x in null))
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.seed)

    def loss_at(step: int) -> torch.Tensor:
        x0, cond = data.batch(config.batch_size, g, device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = sample_timesteps(config.batch_size, "uniform", config.shift, generator=g, device=device)
        return cfg_distill_loss(student, teacher, x0, noise, t, cond, null, config.guidance_scale)

    return optimise(student, opt, config.steps, loss_at, grad_clip=config.grad_clip, on_step=on_step)

"""Trajectory-segmented consistency distillation (TSCD; Hyper-SD, Ren et al. 2024 — the reference followed; phased
consistency models (PCM, Wang et al. 2024) are its closest open relative) of the CFG-distilled model to 16 NFE.

Segments live on the model's own shifted schedule: the boundaries are the 16-step grid t ← s·t/(1+(s−1)·t) of
linspace(1, 0, 17). They are saved with the model (``SamplingSettings.timesteps``) and the sampler steps exactly from
boundary to boundary, so training and inference use the same times.

Within segment [b_k, b_{k+1}] the teacher's trajectory is resolved on ``teacher_substeps`` finer points
b_k = s_0 > … > s_m = b_{k+1}. A training sample takes x at s_j (noised clean latents), makes one teacher Euler step
to s_{j+1}, and lets the target network (an EMA of the student) jump from there to the segment end; the student must
land on the same point in one jump from s_j: x_{s_j} + (b_{k+1} − s_j)·v_student. From s_{m−1} the target is the
teacher's own step (the boundary condition that anchors every segment to the teacher). The loss is measured in
velocity units (divided by the jump length) so short late segments weigh as much as long early ones.

Hyper-SD shrinks the segment count over stages (8 → 4 → 2 → 1) for few-step models; K5 stops at 16 steps, which one
stage with 16 segments reaches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from k5model.distill.common import DistillSet, frozen_copy, model_input, optimise
from k5model.flow_matching import TextCondition, noise_latents, predict_velocity
from k5model.sampling import sampling_grid


@dataclass(frozen=True, kw_only=True)
class TSCDConfig:
    """One TSCD run."""

    num_steps: int = 16
    """NFE of the distilled model = number of segments."""
    shift: float = 10.0
    """The model's sampling shift; the segment boundaries are its shifted grid."""
    teacher_substeps: int = 4
    """Teacher Euler steps resolving each segment (the teacher's effective grid is num_steps × this)."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 4
    """Samples per step."""
    lr: float = 1e-5
    """AdamW learning rate."""
    ema_decay: float = 0.95
    """Target network = EMA of the student with this decay (Hyper-SD/LCM use ~0.95)."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    seed: int = 0
    """Seeds batches, noise and segment/point draws."""


def segment_boundaries(num_steps: int, shift: float) -> list[float]:
    """The num_steps + 1 segment boundaries 1 = b_0 > … > b_N = 0 on the shifted schedule (what is saved with the
    model and what the sampler visits)."""
    return [float(t) for t in sampling_grid(num_steps, shift)]


def _fine_points(boundaries: torch.Tensor, substeps: int) -> torch.Tensor:
    """(N, substeps + 1): each segment's teacher points, linear between its boundaries."""
    frac = torch.linspace(0.0, 1.0, substeps + 1)
    return boundaries[:-1, None] + (boundaries[1:, None] - boundaries[:-1, None]) * frac[None]


def tscd_loss(student: nn.Module, teacher: nn.Module, target: nn.Module, x0: torch.Tensor, noise: torch.Tensor,
              cond: TextCondition, points: torch.Tensor, segment: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Consistency loss for samples at fine point j of segment ``segment`` (tensors of shape (B,))."""
    m = points.shape[1] - 1
    t = points[segment, j]
    t_next = points[segment, j + 1]
    end = points[segment, m]
    x_t = noise_latents(x0, noise, t)
    shape = (-1, *([1] * (x0.ndim - 1)))
    with torch.no_grad():
        x_next = x_t + (t_next - t).view(shape) * predict_velocity(teacher, model_input(teacher, x_t), cond, t)
        v_tail = predict_velocity(target, model_input(target, x_next), cond, t_next)
        tail = torch.where((j + 1 < m).view(shape), (end - t_next).view(shape) * v_tail, torch.zeros_like(v_tail))
        goal = x_next + tail
    jump = (end - t).view(shape)
    pred = x_t + jump * predict_velocity(student, model_input(student, x_t), cond, t)
    return ((pred - goal) / jump).pow(2).mean()


def train_tscd(student: nn.Module, teacher: nn.Module, data: DistillSet, config: TSCDConfig,
               on_step: Callable[[int, dict[str, float]], None] | None = None) -> tuple[list[float], list[dict]]:
    """Train ``student`` (initialised from the CFG-distilled teacher) in place. Returns the segment boundaries to save
    with the model and the per-step metrics."""
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the teacher must be frozen (eval mode, requires_grad False); use distill.common.frozen_copy")
    device = next(student.parameters()).device
    boundaries = segment_boundaries(config.num_steps, config.shift)
    points = _fine_points(torch.tensor(boundaries), config.teacher_substeps).to(device)
    target = frozen_copy(student)
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.seed)

    def loss_at(step: int) -> torch.Tensor:
        x0, cond = data.batch(config.batch_size, g, device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        segment = torch.randint(config.num_steps, (config.batch_size,), generator=g).to(device)
        j = torch.randint(config.teacher_substeps, (config.batch_size,), generator=g).to(device)
        return tscd_loss(student, teacher, target, x0, noise, cond, points, segment, j)

    @torch.no_grad()
    def update_target() -> None:
        for p_t, p_s in zip(target.parameters(), student.parameters(), strict=True):
            p_t.lerp_(p_s.detach(), 1.0 - config.ema_decay)

    history = optimise(student, opt, config.steps, loss_at, grad_clip=config.grad_clip, on_step=on_step,
                       after_step=update_target)
    return boundaries, history

"""Adversarial post-training of the 16-NFE model (report §6.5, Figure 20; LADD-style discriminator).

- Hinge loss: D minimises relu(1 − D(real)) + relu(1 + D(fake)); G minimises −D(fake).
- RMSprop for both, G (the 16-NFE student) at 1e-6, D (the heads) at 1e-4; gradient clipping at 1.0 for both.
- Real and generated latents are re-noised before D with σ ~ logit-normal(−4, 1) (x_σ = (1 − σ)·x + σ·ε, mostly
  small σ): this is what keeps training stable without an R1 penalty, so there is none.
- D = the frozen teacher's visual-block features at the re-noised latents (the teacher sees σ as its timestep and the
  caption as its text) + one small trainable head per tapped block. A head scores every token and averages over
  tokens, so D works for any token grid (resolutions and durations vary within a run).
- Fake latents: the student's one-jump x0 estimate x0 = x_t − t·v from a segment boundary of its own schedule.

Memory plan (video_lite 2B, bf16): the teacher (4 GB of bf16 weights, no grads, no optimiser state) runs inside D and
must keep its activations for G's backward (G's gradient flows through the frozen teacher into the fake latents), so
activation checkpointing is on for both networks. The student carries weights + grads + RMSprop state (one fp32
buffer: ~4 + 4 + 8 GB before sharding); the heads are tiny. Both networks shard with FSDP2 like the stages; the teacher
is wrapped without an optimiser. Two extra teacher forwards per step (real and fake) dominate the cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from k5model.distill.common import DistillSet, model_input
from k5model.flow_matching import TextCondition, noise_latents, predict_velocity, sample_timesteps
from k5model.training.trainer import clip_gradients


@dataclass(frozen=True, kw_only=True)
class AdversarialConfig:
    """One adversarial post-training run (report §6.5 values as defaults)."""

    generator_lr: float = 1e-6
    """RMSprop learning rate of the student."""
    discriminator_lr: float = 1e-4
    """RMSprop learning rate of the discriminator heads."""
    grad_clip: float = 1.0
    """Max global gradient norm, G and D separately."""
    renoise_loc: float = -4.0
    """Mean of the logit-normal re-noising σ."""
    renoise_scale: float = 1.0
    """Std of the logit-normal re-noising σ."""
    feature_blocks: tuple[int, ...] | None = None
    """Teacher visual blocks whose outputs feed a head (None: every block)."""
    head_dim: int = 256
    """Hidden width of each head."""
    steps: int = 1000
    """G/D step pairs."""
    batch_size: int = 4
    """Samples per step."""
    seed: int = 0
    """Seeds batches, noise, segments and σ."""


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def renoise(x: torch.Tensor, generator: torch.Generator, loc: float = -4.0, scale: float = 1.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x_σ with σ ~ logit-normal(loc, scale) per sample; returns (x_σ, σ)."""
    sigma = sample_timesteps(x.shape[0], "logit_normal", loc=loc, scale=scale, generator=generator, device=x.device)
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    return noise_latents(x, noise, sigma), sigma


class TeacherFeatureDiscriminator(nn.Module):
    """Frozen teacher trunk + per-block token heads; logits (B,)."""

    def __init__(self, teacher: nn.Module, *, feature_blocks: Sequence[int] | None = None, head_dim: int = 256):
        super().__init__()
        if any(p.requires_grad for p in teacher.parameters()):
            raise ValueError("the discriminator's teacher must be frozen (requires_grad False)")
        blocks = teacher.visual_transformer_blocks
        self.feature_blocks = tuple(range(len(blocks))) if feature_blocks is None else tuple(feature_blocks)
        if not self.feature_blocks or any(not 0 <= i < len(blocks) for i in self.feature_blocks):
            raise ValueError(f"feature_blocks {feature_blocks} must index the teacher's {len(blocks)} visual blocks")
        self._teacher = [teacher]  # not a child: its weights are neither trained nor saved with the heads
        dim = teacher.config.model_dim
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, head_dim), nn.SiLU(), nn.Linear(head_dim, 1))
            for _ in self.feature_blocks)

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor, text: TextCondition) -> torch.Tensor:
        teacher = self._teacher[0]
        features: list[torch.Tensor] = []
        hooks = [teacher.visual_transformer_blocks[i].register_forward_hook(
            lambda module, args, out: features.append(out)) for i in self.feature_blocks]
        try:
            predict_velocity(teacher, model_input(teacher, x_noisy), text, sigma)
        finally:
            for h in hooks:
                h.remove()
        # each head scores every token; the token mean makes the logit independent of the grid size
        return sum(head(f.float()).squeeze(-1).mean(dim=1) for head, f in zip(self.heads, features, strict=True))


def fake_latents(student: nn.Module, x0: torch.Tensor, noise: torch.Tensor, cond: TextCondition,
                 boundaries: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The student's clean-latent estimate from a random segment boundary: x0 ≈ x_t − t·v."""
    k = torch.randint(len(boundaries) - 1, (x0.shape[0],), generator=generator).to(x0.device)
    t = boundaries[k]
    x_t = noise_latents(x0, noise, t)
    return x_t - t.view(-1, *([1] * (x0.ndim - 1))) * predict_velocity(student, model_input(student, x_t), cond, t)


def train_adversarial(student: nn.Module, discriminator: TeacherFeatureDiscriminator, data: DistillSet,
                      boundaries: Sequence[float], config: AdversarialConfig,
                      on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Alternate one D step and one G step per iteration on the 16-NFE ``student`` in place; returns the metrics."""
    device = next(student.parameters()).device
    opt_g = torch.optim.RMSprop(student.parameters(), lr=config.generator_lr)
    opt_d = torch.optim.RMSprop(discriminator.heads.parameters(), lr=config.discriminator_lr)
    times = torch.tensor([float(b) for b in boundaries], device=device)
    g = torch.Generator().manual_seed(config.seed)
    renoise_kw = dict(loc=config.renoise_loc, scale=config.renoise_scale)
    history = []
    student.train()
    for step in range(1, config.steps + 1):
        x0, cond = data.batch(config.batch_size, g, device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        fake = fake_latents(student, x0, noise, cond, times, g)
        real_in, real_sigma = renoise(x0, g, **renoise_kw)
        fake_in, fake_sigma = renoise(fake.detach(), g, **renoise_kw)
        d_loss = hinge_discriminator_loss(discriminator(real_in, real_sigma, cond),
                                          discriminator(fake_in, fake_sigma, cond))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        d_norm = clip_gradients(discriminator.heads.parameters(), config.grad_clip)
        opt_d.step()

        fake_in, fake_sigma = renoise(fake, g, **renoise_kw)
        g_loss = hinge_generator_loss(discriminator(fake_in, fake_sigma, cond))
        opt_g.zero_grad(set_to_none=True)
        discriminator.heads.requires_grad_(False)  # G's step must not move D
        g_loss.backward()
        discriminator.heads.requires_grad_(True)
        g_norm = clip_gradients(student.parameters(), config.grad_clip)
        opt_g.step()
        metrics = {"d_loss": d_loss.item(), "g_loss": g_loss.item(), "d_grad_norm": d_norm, "g_grad_norm": g_norm}
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    student.eval()
    return history

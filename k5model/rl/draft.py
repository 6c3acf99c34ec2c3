"""DRaFT-K with a KL anchor for flow-matching models (report §6.6; DRaFT Algorithm 1, Clark et al. 2024).

One step: sample with the policy through the official Euler grid; the first N − K steps run without a graph, the last
K with one; decode, score against the real image, and minimise

    L = 1 − R(x_gen, x_real, y) + β · Σ_t ‖v_RL(x_t, t) − v_SFT(x_t, t)‖²     (sum over the K grad steps, β = 2e-2)

Decisions (the report is silent on them):

- CFG: the conditional branch is in the graph, the unconditional one runs under ``no_grad`` (a batched CFG forward
  would add (1 − w)·∂v_u/∂θ to the gradient; the report's recipe and UniRL both stop it).
- The KL compares the CONDITIONAL velocities of the policy and of the frozen SFT copy at the states x_t the policy
  visits; v_SFT is a target (computed without a graph), so the frozen copy costs one forward per grad step and no
  activations. ‖·‖² is averaged over a sample's latent elements (``kl_reduction="mean"``, resolution independent) or
  summed (``"sum"``, the formula taken literally); per-sample values are summed over steps and averaged over the batch.
- Activation checkpointing (``checkpoint_steps``) recomputes each grad step's conditional forward in backward, so only
  the step input is kept; ``offload_to_cpu`` additionally keeps those saved inputs in (pinned) host memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from k5model.flow_matching import (
    TextCondition,
    as_text_condition,
    expand_batch,
    predict_velocity,
    visual_condition,
)
from k5model.sampling import sampling_grid

KL_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True, kw_only=True)
class DraftConfig:
    """One DRaFT-K rollout."""

    num_steps: int = 50
    """Euler steps N of the sampler."""
    k: int = 10
    """Last steps back-propagated through (report: 10 for images); 1 <= k <= num_steps."""
    beta_kl: float = 2e-2
    """Weight β of the KL term (report: 2e-2 for text-to-image)."""
    guidance_scale: float = 5.0
    """CFG weight w; 1.0 runs the conditional branch only."""
    shift: float = 3.0
    """Timestep shift of the sampling grid (image models: 3.0)."""
    scale_factor: tuple[float, float, float] = (1.0, 2.0, 2.0)
    """RoPE scale of the CrossDiT (as in sampling)."""
    kl_reduction: str = "mean"
    """How ‖v_RL − v_SFT‖² reduces over a sample's latent elements: "mean" or "sum"."""
    checkpoint_steps: bool = False
    """Recompute each grad step's conditional forward in backward (activation checkpointing)."""
    offload_to_cpu: bool = False
    """Keep the tensors saved for backward in host memory during the grad window."""

    def __post_init__(self) -> None:
        if self.num_steps < 1 or not 1 <= self.k <= self.num_steps:
            raise ValueError(f"need num_steps >= 1 and 1 <= k <= num_steps, got num_steps={self.num_steps}, k={self.k}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}")
        if self.beta_kl < 0:
            raise ValueError(f"beta_kl must be >= 0, got {self.beta_kl}")


@dataclass
class DraftRollout:
    """The generated latents (in the graph of the last K steps) and the KL term."""

    latents: torch.Tensor
    """x_0 (B, T, H, W, C) fp32."""
    kl: torch.Tensor
    """Σ over the K grad steps of ‖v_RL − v_SFT‖², averaged over the batch (scalar, in the graph)."""
    kl_per_step: list[torch.Tensor]
    """Per grad step, per sample (B,) squared distances (in the graph)."""


def _model_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Image models (visual_cond False) read the 16 noisy channels; video models add empty condition channels.
    return visual_condition(x) if getattr(model, "visual_cond", False) else x


def _velocity(model: torch.nn.Module, x: torch.Tensor, text: TextCondition, t: torch.Tensor,
              scale_factor: Sequence[float]) -> torch.Tensor:
    return predict_velocity(model, _model_input(model, x), text, t, scale_factor=scale_factor)


def _squared_distance(a: torch.Tensor, b: torch.Tensor, reduction: str) -> torch.Tensor:
    d = (a - b).pow(2).flatten(1)
    return d.mean(1) if reduction == "mean" else d.sum(1)


def draft_rollout(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    *,
    noise: torch.Tensor,
    cond: TextCondition | tuple,
    uncond: TextCondition | tuple | None,
    config: DraftConfig,
) -> DraftRollout:
    """Sample x_0 from ``noise`` (B, T, H, W, C) with the policy; a graph only through the last ``config.k`` steps.

    ``reference`` is the frozen SFT copy (its parameters should not require grad). ``uncond`` None or guidance 1.0
    runs without CFG."""
    cond = as_text_condition(cond)
    use_cfg = uncond is not None and config.guidance_scale != 1.0
    uncond = as_text_condition(uncond) if use_cfg else None
    if use_cfg and uncond.embeds.shape[0] != noise.shape[0]:
        uncond = expand_batch(uncond, noise.shape[0])
    w = config.guidance_scale
    grid = sampling_grid(config.num_steps, config.shift).to(noise.device)
    first_grad = config.num_steps - config.k
    sf = config.scale_factor

    x = noise.float()
    with torch.no_grad():
        for i in range(first_grad):
            t, dt = grid[i], grid[i + 1] - grid[i]
            v = _velocity(policy, x, cond, t, sf)
            if use_cfg:
                v_u = _velocity(policy, x, uncond, t, sf)
                v = v_u + w * (v - v_u)
            x = x + dt * v
    x = x.detach()

    kl_steps: list[torch.Tensor] = []
    offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if config.offload_to_cpu \
        else nullcontext()
    with offload:
        for i in range(first_grad, config.num_steps):
            t, dt = grid[i], grid[i + 1] - grid[i]
            if config.checkpoint_steps:
                v_c = checkpoint(_velocity, policy, x, cond, t, sf, use_reentrant=False)
            else:
                v_c = _velocity(policy, x, cond, t, sf)
            with torch.no_grad():  # the uncond branch and the anchor are constants of this step
                x_in = x.detach()
                v_ref = _velocity(reference, x_in, cond, t, sf)
                v_u = _velocity(policy, x_in, uncond, t, sf) if use_cfg else None
            kl_steps.append(_squared_distance(v_c, v_ref, config.kl_reduction))
            v = v_c if v_u is None else v_u + w * (v_c - v_u)
            x = x + dt * v
    kl = torch.stack(kl_steps).sum(0).mean()
    return DraftRollout(latents=x, kl=kl, kl_per_step=kl_steps)


@dataclass
class DraftLoss:
    """The scalar to back-propagate and its parts (the parts detached, for logging)."""

    loss: torch.Tensor
    reward: torch.Tensor
    kl: torch.Tensor
    latents: torch.Tensor


def draft_k_loss(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    *,
    noise: torch.Tensor,
    cond: TextCondition | tuple,
    uncond: TextCondition | tuple | None,
    decode: Callable[[torch.Tensor], torch.Tensor],
    reward: Callable[[torch.Tensor, torch.Tensor, Sequence[str]], torch.Tensor],
    real_images: torch.Tensor,
    prompts: Sequence[str],
    config: DraftConfig,
) -> DraftLoss:
    """L = mean_b(1 − R(decode(x_gen), x_real, y)) + β · KL for one batch.

    ``decode`` maps latents (B, T, H, W, C) to pixels (B, 3, H, W) in [-1, 1] differentiably (e.g. ``ImageVAE.decode``);
    ``reward`` is R(first, second, prompts) -> (B,) in [0, 1] (e.g. a :class:`RelativeRewardModel`) with the generated
    image first and the real SFT image second, as in the report."""
    rollout = draft_rollout(policy, reference, noise=noise, cond=cond, uncond=uncond, config=config)
    pixels = decode(rollout.latents)
    r = reward(pixels, real_images.to(pixels.device), list(prompts))
    loss = (1.0 - r).mean() + config.beta_kl * rollout.kl
    return DraftLoss(loss=loss, reward=r.detach(), kl=rollout.kl.detach(), latents=rollout.latents.detach())

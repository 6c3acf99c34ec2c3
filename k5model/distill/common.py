"""What the distillation stages share: a paired set of latents and captions, frozen copies, the model input, and the
latent deviation used by the acceptance comparisons."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from k5model.flow_matching import TextCondition, as_text_condition, pad_text, visual_condition
from k5model.sampling import sample
from k5model.training.trainer import clip_gradients


@dataclass
class DistillSet:
    """Clean latents (N, T, H, W, 16) and their captions' text condition (batch N, padded to one length). In
    production these come from the latent shards; at demo scale they are the teacher's own guided samples."""

    latents: torch.Tensor
    text: TextCondition

    def __post_init__(self) -> None:
        if self.latents.ndim != 5 or self.text.embeds.shape[0] != self.latents.shape[0]:
            raise ValueError(f"DistillSet needs latents (N, T, H, W, C) and N text rows, got latents "
                             f"{tuple(self.latents.shape)} and text batch {self.text.embeds.shape[0]}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, size: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, TextCondition]:
        idx = torch.randint(len(self), (size,), generator=generator)
        text = TextCondition(*(None if x is None else x[idx].to(device) for x in self.text))
        return self.latents[idx].to(device), text


def optimise(model: nn.Module, opt: torch.optim.Optimizer, steps: int, loss_at: Callable[[int], torch.Tensor], *,
             grad_clip: float, on_step: Callable[[int, dict[str, float]], None] | None = None,
             after_step: Callable[[], None] | None = None) -> list[dict[str, float]]:
    """The loop the regression stages share: loss, backward, global-norm clip, step, optional ``after_step`` (a target
    network's EMA); returns the per-step metrics. The model is in train mode during and eval mode after."""
    model.train()
    history = []
    for step in range(1, steps + 1):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = clip_gradients(model.parameters(), grad_clip)
        opt.step()
        if after_step is not None:
            after_step()
        metrics = {"loss": loss.item(), "grad_norm": norm}
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    model.eval()
    return history


def stack_text(conds: Sequence[TextCondition]) -> TextCondition:
    """Batch-1 conditions → one batch, right-padded to the longest with the padding masked."""
    conds = [as_text_condition(c) for c in conds]
    length = max(c.embeds.shape[1] for c in conds)
    padded = [pad_text(c, length) for c in conds]
    return TextCondition(*(torch.cat([getattr(p, f) for p in padded]) for f in ("embeds", "mask", "pooled")))


def frozen_copy(model: nn.Module) -> nn.Module:
    """An independent eval-mode copy with gradients off (teachers, targets)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def model_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The noisy latents as the model takes them (text-to-video: zero condition channels and mask)."""
    return visual_condition(x) if getattr(model, "visual_cond", False) else x


@torch.no_grad()
def sample_set(model: nn.Module, prompts: Sequence[TextCondition], seeds: Sequence[int], *, shape: Sequence[int],
               num_steps: int, shift: float, guidance_scale: float = 1.0, null: TextCondition | None = None,
               timesteps: Sequence[float] | None = None) -> torch.Tensor:
    """Latents for every (prompt, seed) pair, (P·S, T, H, W, C), in a fixed order."""
    out = []
    for cond in prompts:
        for seed in seeds:
            out.append(sample(model, latent_shape=(1, *shape), cond=cond, uncond=null, seed=seed,
                              guidance_scale=guidance_scale, num_steps=num_steps, shift=shift,
                              timesteps=timesteps, progress=False))
    return torch.cat(out)


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference of two equally ordered latent sets."""
    if a.shape != b.shape:
        raise ValueError(f"latent sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.float() - b.float()).pow(2).mean())

"""Rectified-flow (flow matching) training maths of Kandinsky 5.0.

Convention (official code): noise at t=1, data at t=0, straight path x_t = (1 - t)·x0 + t·ε, the model predicts the
velocity dx_t/dt = ε - x0 and receives t·1000 in fp32.

Visual conditioning (``model.visual_cond``): the model input is 33 channels per latent voxel = 16 noisy + 16 condition
+ 1 mask. T2V/T2I samples get zero condition and zero mask. I2V samples (official training semantics, which the
sampler mirrors): the condition channels hold the clean latent of frame 0 with mask 1 on frame 0, frame 0 of the noisy
channels is also kept clean (it is never noised, just as the sampler writes it back every step), and frame 0 is left out
of the loss because there is nothing to predict for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

TIMESTEP_SCALE = 1000.0


class TextCondition(NamedTuple):
    """Text conditioning of a batch: Qwen states (B, L, D), their mask (B, L) bool (True = real token) and the
    CLIP pooled vector (B, D_pool). A NamedTuple so ``embeds, mask, pooled = cond`` works as well."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    pooled: torch.Tensor


def as_text_condition(cond: Any, pooled: torch.Tensor | None = None) -> TextCondition:
    """Accept a TextCondition, a 3-tuple, or any object with ``embeds``/``mask`` (and ``pooled``) attributes,
    e.g. the encoders' ``TextEncoding`` plus a separately computed CLIP ``pooled``."""
    if isinstance(cond, TextCondition):
        return cond
    if isinstance(cond, tuple | list):
        if len(cond) != 3:
            raise ValueError(f"a text condition tuple must be (embeds, mask, pooled), got {len(cond)} items")
        return TextCondition(*cond)
    embeds = cond.embeds
    mask = getattr(cond, "mask", None)
    pooled = pooled if pooled is not None else getattr(cond, "pooled", None)
    if pooled is None:
        raise ValueError("text condition has no pooled (CLIP) vector")
    return TextCondition(embeds, mask, pooled)


def full_mask(embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)


def pad_text(cond: TextCondition, length: int) -> TextCondition:
    """Right-pad embeds with zeros and the mask with False up to ``length`` tokens."""
    embeds, mask, pooled = cond
    mask = full_mask(embeds) if mask is None else mask.bool()
    extra = length - embeds.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {embeds.shape[1]} text tokens down to {length}")
    if extra:
        embeds = F.pad(embeds, (0, 0, 0, extra))
        mask = F.pad(mask, (0, extra), value=False)
    return TextCondition(embeds, mask, pooled)


def expand_batch(cond: TextCondition, batch: int) -> TextCondition:
    """Broadcast a batch-1 condition (e.g. the empty prompt) to ``batch`` samples."""
    if cond.embeds.shape[0] == batch:
        return cond
    if cond.embeds.shape[0] != 1:
        raise ValueError(f"text condition has batch {cond.embeds.shape[0]}, expected 1 or {batch}")
    mask = None if cond.mask is None else cond.mask.expand(batch, -1)
    return TextCondition(cond.embeds.expand(batch, -1, -1), mask, cond.pooled.expand(batch, -1))


def _per_sample(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t as (B, 1, 1, ...) broadcastable against ``like``."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def noise_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t)·x0 + t·ε, t per sample (B,) or a scalar."""
    tt = _per_sample(t, x0)
    return (1 - tt) * x0 + tt * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t = ε - x0 (what the model learns to predict)."""
    return noise - x0


def shift_timesteps(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """t ← s·t / (1 + (s - 1)·t): s > 1 spends more steps/training at high noise (large latents need it)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    n: int,
    scheme: str = "uniform",
    shift: float = 1.0,
    loc: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n training times in [0, 1] (fp32): ``uniform`` U(0,1) or ``logit_normal`` sigmoid(N(loc, scale²)), then
    shifted. Drawn on the CPU generator so a seed gives the same times on every device."""
    if scheme == "uniform":
        t = torch.rand(n, generator=generator, dtype=torch.float32)
    elif scheme == "logit_normal":
        t = torch.sigmoid(loc + scale * torch.randn(n, generator=generator, dtype=torch.float32))
    else:
        raise ValueError(f"unknown timestep scheme {scheme!r}; use 'uniform' or 'logit_normal'")
    t = shift_timesteps(t, shift) if shift != 1.0 else t
    return t.to(device) if device is not None else t


def model_timestep(t: torch.Tensor | float, batch: int | None = None) -> torch.Tensor:
    """The timestep the CrossDiT embeds: t·1000 in fp32 (diffusers rounds it to bf16; the official code does not)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if batch is not None and t.ndim == 0:
        t = t.expand(batch)
    return t.float() * TIMESTEP_SCALE


def drop_text_condition(
    cond: TextCondition | Sequence[torch.Tensor],
    null_cond: TextCondition | Sequence[torch.Tensor],
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[TextCondition, torch.Tensor]:
    """Classifier-free-guidance dropout: with probability ``p`` per sample, replace that sample's embeds, mask and
    pooled vector by those of the empty prompt (``null_cond``, batch 1 or B). Both are padded to a common length.
    Returns the new condition and the (B,) bool tensor of dropped samples."""
    cond, null_cond = as_text_condition(cond), as_text_condition(null_cond)
    b = cond.embeds.shape[0]
    drop = torch.rand(b, generator=generator) < p
    length = max(cond.embeds.shape[1], null_cond.embeds.shape[1])
    c = pad_text(cond, length)
    n = expand_batch(pad_text(null_cond, length), b)
    dev = c.embeds.device
    n = TextCondition(n.embeds.to(dev), n.mask.to(dev), n.pooled.to(dev))
    d = drop.to(dev)
    embeds = torch.where(d[:, None, None], n.embeds.to(c.embeds.dtype), c.embeds)
    mask = torch.where(d[:, None], n.mask, c.mask)
    pooled = torch.where(d[:, None], n.pooled.to(c.pooled.dtype), c.pooled)
    return TextCondition(embeds, mask, pooled), drop


def rope_positions(
    latent_shape: Sequence[int], patch_size: Sequence[int] = (1, 2, 2), device: torch.device | str | None = None
) -> list[torch.Tensor]:
    """Visual RoPE positions in latent-patch units for latents (B, T, H, W, C)."""
    _, t, h, w = latent_shape[:4]
    return [torch.arange(n // p, device=device) for n, p in zip((t, h, w), patch_size)]


def predict_velocity(
    model: torch.nn.Module,
    hidden_states: torch.Tensor,
    cond: TextCondition,
    t: torch.Tensor,
    *,
    scale_factor: Sequence[float] = (1.0, 2.0, 2.0),
    sparse_params: dict | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One CrossDiT forward returning the velocity (B, T, H, W, 16) in fp32.

    ``t`` is in [0, 1] (scalar or (B,)); inputs are cast to ``dtype`` (default: the model's), the timestep stays
    fp32."""
    dtype = dtype or model.dtype
    embeds, mask, pooled = cond
    b = hidden_states.shape[0]
    patch = tuple(getattr(model.config, "patch_size", (1, 2, 2)))
    kwargs = dict(
        hidden_states=hidden_states.to(dtype),
        encoder_hidden_states=embeds.to(dtype),
        timestep=model_timestep(t, b).to(hidden_states.device),
        pooled_projections=pooled.to(dtype),
        visual_rope_pos=rope_positions(hidden_states.shape, patch, hidden_states.device),
        text_rope_pos=torch.arange(embeds.shape[1], device=hidden_states.device),
        scale_factor=tuple(scale_factor),
        sparse_params=sparse_params,
        return_dict=True,
    )
    if mask is not None:
        kwargs["encoder_attention_mask"] = mask.bool()
    return model(**kwargs).sample.float()


def visual_condition(
    noisy: torch.Tensor,
    first_frame: torch.Tensor | None = None,
    conditioned: torch.Tensor | None = None,
) -> torch.Tensor:
    """The 33-channel model input: noisy (B,T,H,W,16) ‖ condition (16) ‖ mask (1).

    ``first_frame`` (B,1,H,W,16) fills frame 0 of the condition with mask 1 for the samples flagged in
    ``conditioned`` (B,) bool (all samples if None); everything else is zero."""
    cond = torch.zeros_like(noisy)
    mask = torch.zeros(*noisy.shape[:-1], 1, dtype=noisy.dtype, device=noisy.device)
    if first_frame is not None:
        sel = torch.ones(noisy.shape[0], dtype=torch.bool, device=noisy.device) if conditioned is None else conditioned
        sel = sel.to(noisy.device)[:, None, None, None, None]
        cond[:, :1] = torch.where(sel, first_frame.to(noisy.dtype), cond[:, :1])
        mask[:, :1] = sel.to(noisy.dtype)
    return torch.cat([noisy, cond, mask], dim=-1)


def _conditioned_samples(
    visual_cond: bool | float | torch.Tensor | None, b: int, generator: torch.Generator | None
) -> torch.Tensor | None:
    if visual_cond is None or visual_cond is False:
        return None
    if visual_cond is True:
        return torch.ones(b, dtype=torch.bool)
    if isinstance(visual_cond, torch.Tensor):
        if visual_cond.shape != (b,):
            raise ValueError(f"visual_cond mask must have shape ({b},), got {tuple(visual_cond.shape)}")
        return visual_cond.bool().cpu()
    p = float(visual_cond)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"visual_cond probability must be in [0, 1], got {p}")
    return torch.rand(b, generator=generator) < p


def flow_matching_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor | None,
    pooled: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    shift: float = 1.0,
    scheme: str = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    visual_cond: bool | float | torch.Tensor | None = None,
    scale_factor: Sequence[float] = (1.0, 2.0, 2.0),
    sparse_params: dict | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE between the model's velocity and ε - x0 on the 16 noisy channels.

    x0 (B, T, H, W, 16) clean latents. ``t`` (B,) in [0, 1] and ``noise`` default to draws from ``generator``
    (``sample_timesteps(scheme, shift, loc, scale)`` and a standard normal, both on CPU for reproducibility).
    ``visual_cond``: None/False = no image condition; True = every sample is I2V; a float p = each sample is I2V with
    probability p (official fine-tune: 0.2); a (B,) bool tensor = explicit choice. I2V samples keep frame 0 clean and
    exclude it from the loss (module docstring). Returns (loss, aux) with aux = t, noise, x_t, target, pred (detached),
    conditioned (B,) bool and per-sample loss.
    """
    if x0.ndim != 5:
        raise ValueError(f"x0 must be (B, T, H, W, C), got shape {tuple(x0.shape)}")
    b = x0.shape[0]
    x0 = x0.float()
    if t is None:
        t = sample_timesteps(b, scheme, shift, loc, scale, generator=generator)
    t = torch.as_tensor(t, dtype=torch.float32, device=x0.device)
    if t.ndim == 0:
        t = t.expand(b)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(x0.device, torch.float32)

    x_t = noise_latents(x0, noise, t)
    target = velocity_target(x0, noise)
    weight = torch.ones(*x0.shape[:-1], 1, device=x0.device)  # which voxels count in the loss

    conditioned = _conditioned_samples(visual_cond, b, generator)
    if conditioned is not None and not getattr(model, "visual_cond", False):
        raise ValueError("visual_cond was requested but the model has no visual-condition channels")
    if getattr(model, "visual_cond", False):
        first = x0[:, :1] if conditioned is not None else None
        if conditioned is not None:
            sel = conditioned.to(x0.device)[:, None, None, None, None]
            # I2V: frame 0 is given, not generated, so it is clean in the input and carries no loss.
            x_t = torch.cat([torch.where(sel, x0[:, :1], x_t[:, :1]), x_t[:, 1:]], dim=1)
            weight[:, :1] = (~sel).float().expand_as(weight[:, :1])
        model_in = visual_condition(x_t, first, conditioned)
    else:
        model_in = x_t

    cond = TextCondition(text_embeds, text_mask, pooled)
    pred = predict_velocity(model, model_in, cond, t, scale_factor=scale_factor, sparse_params=sparse_params)
    sq = (pred - target).pow(2) * weight
    channels = x0.shape[-1]
    counts = weight.flatten(1).sum(1) * channels
    per_sample = sq.flatten(1).sum(1) / counts.clamp_min(1)
    loss = sq.sum() / (counts.sum().clamp_min(1))
    aux = {
        "t": t.detach(),
        "noise": noise,
        "x_t": x_t.detach(),
        "target": target,
        "pred": pred.detach(),
        "conditioned": conditioned if conditioned is not None else torch.zeros(b, dtype=torch.bool),
        "loss_per_sample": per_sample.detach(),
    }
    return loss, aux



TASK_KINDS = ("t2i", "t2v", "i2v", "edit")


def condition_channels(x0: torch.Tensor, task: str, source: torch.Tensor | None = None) -> torch.Tensor:
    """The (T, H, W, C+1) condition + mask of one latent ``x0`` (T, H, W, C) for ``task``.

    t2v / t2i: zeros. i2v: the clean first latent frame with mask 1 on it. edit: the ``source`` image's latent with
    mask ones (instruct editing)."""
    if task not in TASK_KINDS:
        raise ValueError(f"unknown task {task!r}; use one of {TASK_KINDS}")
    c = torch.zeros(*x0.shape[:-1], x0.shape[-1] + 1, dtype=torch.float32, device=x0.device)
    if task == "i2v":
        c[:1, ..., :-1], c[:1, ..., -1] = x0[:1], 1.0
    elif task == "edit":
        if source is None:
            raise ValueError("an edit sample needs its source latent")
        c[..., :-1], c[..., -1] = source.to(x0.device, torch.float32).reshape(x0.shape), 1.0
    return c


def flow_matching_loss_packed(
    model: torch.nn.Module,
    x0: Sequence[torch.Tensor],
    text_embeds: Sequence[torch.Tensor],
    pooled: torch.Tensor,
    *,
    condition: Sequence[torch.Tensor | None] | None = None,
    clean_frames: Sequence[int] | None = None,
    t: torch.Tensor | None = None,
    noise: Sequence[torch.Tensor] | None = None,
    shift: float = 1.0,
    scheme: str = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    scale_factor: Sequence[float] = (1.0, 2.0, 2.0),
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``flow_matching_loss`` for a packed batch: N latents of different shapes in ONE ``CrossDiT.forward_packed``
    sequence, each with its own timestep, text and condition (report §6.1.2 packing).

    x0: N clean latents (T_i, H_i, W_i, 16); text_embeds: N (L_i, D) real text tokens only (no padding);
    pooled (N, D_pool). ``condition``: per sample the 17 condition+mask channels (T_i, H_i, W_i, 17) or None (zeros:
    T2V/T2I), only for ``visual_cond`` models; I2V gives the clean frame-0 latent with mask 1 on frame 0, editing the
    source latent with mask ones. ``clean_frames``: per sample, leading frames kept clean in the noisy channels and
    left out of the loss (1 for I2V, as in the batched loss). ``t`` (N,) in [0, 1] and ``noise`` default to draws
    from ``generator`` (timesteps first, then one normal tensor per sample, in order).
    The loss is the mean over every counted voxel and channel of the pack (each real token weighs the same).
    Returns (loss, aux) with aux = t, noise, per-sample loss and ``tokens`` (real visual tokens after patching)."""
    n = len(x0)
    if n == 0 or len(text_embeds) != n or pooled.shape[0] != n:
        raise ValueError(f"packed batch sizes disagree: {n} latents, {len(text_embeds)} texts, "
                         f"{pooled.shape[0]} pooled vectors")
    if any(x.ndim != 4 for x in x0):
        raise ValueError(f"packed latents must be (T, H, W, C), got shapes {[tuple(x.shape) for x in x0]}")
    visual_cond = bool(getattr(model, "visual_cond", False))
    if condition is not None and len(condition) != n:
        raise ValueError(f"{len(condition)} condition tensors for {n} latents")
    if condition is not None and not visual_cond and any(c is not None for c in condition):
        raise ValueError("a visual condition was given but the model has no visual-condition channels")
    clean = list(clean_frames) if clean_frames is not None else [0] * n
    if len(clean) != n or any(not 0 <= k < x.shape[0] for k, x in zip(clean, x0)):
        raise ValueError(f"clean_frames {clean} must give 0 <= k < T per sample")
    device = x0[0].device
    x0 = [x.float() for x in x0]
    if t is None:
        t = sample_timesteps(n, scheme, shift, loc, scale, generator=generator)
    t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(n)
    if noise is None:
        noise = [torch.randn(x.shape, generator=generator, dtype=torch.float32) for x in x0]
    noise = [e.to(device, torch.float32) for e in noise]

    inputs, targets, weights = [], [], []
    for i, (x, e) in enumerate(zip(x0, noise)):
        x_t = noise_latents(x[None], e[None], t[i:i + 1])[0]
        w = torch.ones(*x.shape[:-1], 1, device=device)
        if clean[i]:
            x_t = torch.cat([x[:clean[i]], x_t[clean[i]:]])  # given frames: clean in the input, no loss
            w[:clean[i]] = 0
        if visual_cond:
            c = condition[i] if condition is not None else None
            c = condition_channels(x, "t2v") if c is None else c.to(device)
            x_t = torch.cat([x_t, c.to(x_t.dtype)], dim=-1)
        inputs.append(x_t)
        targets.append(velocity_target(x, e))
        weights.append(w)
    dtype = dtype or model.dtype
    preds = model.forward_packed(
        [x.to(dtype) for x in inputs], [e.to(device, dtype) for e in text_embeds],
        timestep=model_timestep(t).to(device), pooled_projections=pooled.to(device, dtype),
        scale_factor=tuple(scale_factor),
    )
    sq = [(p.float() - y).pow(2) * w for p, y, w in zip(preds, targets, weights)]
    channels = x0[0].shape[-1]
    counts = torch.stack([w.sum() * channels for w in weights])
    sums = torch.stack([s.sum() for s in sq])
    loss = sums.sum() / counts.sum().clamp_min(1)
    patch = tuple(getattr(getattr(model, "config", None), "patch_size", (1, 2, 2)))
    tokens = sum((x.shape[0] // patch[0]) * (x.shape[1] // patch[1]) * (x.shape[2] // patch[2]) for x in x0)
    aux = {"t": t.detach(), "noise": noise, "loss_per_sample": (sums / counts.clamp_min(1)).detach(),
           "pred": [p.detach().float() for p in preds], "tokens": tokens}
    return loss, aux

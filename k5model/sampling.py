"""Euler sampler of Kandinsky 5.0 (official grid), batched classifier-free guidance and image-to-video.

Grid: t = linspace(1, 0, N+1) shifted by s·t/(1+(s-1)·t) — the official one. diffusers' FlowMatchEulerDiscreteScheduler
builds a different grid (it shifts linspace(1, 1/N, N) and appends 0), so its last non-zero σ is ≈0.091 instead of
≈0.169 at s=10, N=50; we follow the official code.

CFG: both branches go through ONE forward (batch 2B). The two prompts are right-padded to a common length and the
padding is hidden with ``encoder_attention_mask``; text RoPE positions are arange(L), so real tokens keep their
positions and the result equals two sequential forwards (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from k5model.flow_matching import (
    TextCondition,
    as_text_condition,
    expand_batch,
    pad_text,
    predict_velocity,
    shift_timesteps,
    visual_condition,
)

if TYPE_CHECKING:
    from k5model.magcache import MagCache

# I2V post-step (official "fix mesh artifacts"): how far the first frames' statistics may move toward the reference.
FIRST_FRAMES = 4
REFERENCE_FRAMES = 5
MEAN_CLAMP = (0.05, 0.1)  # reference mean limited to [mean - 0.05, mean + 0.1] of the first frames
STD_CLAMP = (0.1, 0.25)  # reference std limited to [std - 0.1, std + 0.25]


def sampling_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The N+1 times t_0 = 1 > ... > t_N = 0 (fp32) visited by the Euler sampler."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32), shift)


def explicit_grid(timesteps: Sequence[float], num_steps: int) -> torch.Tensor:
    """A saved grid (e.g. TSCD segment boundaries) as fp32, checked: num_steps + 1 values from 1 down to 0."""
    grid = torch.as_tensor([float(t) for t in timesteps], dtype=torch.float32)
    if grid.shape != (num_steps + 1,) or grid[0] != 1.0 or grid[-1] != 0.0 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"timesteps must be {num_steps + 1} strictly decreasing values from 1.0 to 0.0 "
                         f"(num_steps={num_steps}), got {[round(float(t), 4) for t in timesteps]}")
    return grid


def cfg_batch(cond: TextCondition, uncond: TextCondition) -> TextCondition:
    """Stack the conditional and unconditional text of B samples into one batch of 2B (cond first), padded to a
    common length with the padding masked out."""
    b = cond.embeds.shape[0]
    uncond = expand_batch(uncond, b)
    length = max(cond.embeds.shape[1], uncond.embeds.shape[1])
    c, u = pad_text(cond, length), pad_text(uncond, length)
    return TextCondition(
        torch.cat([c.embeds, u.embeds.to(c.embeds.dtype)]),
        torch.cat([c.mask, u.mask]),
        torch.cat([c.pooled, u.pooled.to(c.pooled.dtype)]),
    )


def guided_velocity(
    model: torch.nn.Module,
    hidden_states: torch.Tensor,
    t: torch.Tensor | float,
    text: TextCondition,
    guidance_scale: float,
    *,
    batched_cfg: bool = True,
    uncond: TextCondition | None = None,
    scale_factor: Sequence[float] = (1.0, 2.0, 2.0),
    sparse_params: dict | None = None,
    dtype: torch.dtype | None = None,
    branch_hook: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """v = v_u + w·(v_c - v_u). ``text`` is either a single condition (no guidance) or, with ``batched_cfg``, the
    2B-batch of :func:`cfg_batch`; with ``batched_cfg=False`` the branches run sequentially (``text`` = cond,
    ``uncond`` given) — kept for the equivalence test, for memory-bound runs and for MagCache, whose
    ``branch_hook`` is told which branch ("cond" / "uncond") the next forward computes."""
    kw = dict(scale_factor=scale_factor, sparse_params=sparse_params, dtype=dtype)
    hook = branch_hook or (lambda branch: None)
    if guidance_scale == 1.0 or (not batched_cfg and uncond is None):
        hook("cond")
        return predict_velocity(model, hidden_states, text, t, **kw)
    if batched_cfg:
        v = predict_velocity(model, torch.cat([hidden_states, hidden_states]), text, t, **kw)
        v_c, v_u = v.chunk(2)
    else:
        hook("cond")
        v_c = predict_velocity(model, hidden_states, text, t, **kw)
        hook("uncond")
        v_u = predict_velocity(model, hidden_states, uncond, t, **kw)
    return v_u + guidance_scale * (v_c - v_u)


def normalize_first_frames(latents: torch.Tensor) -> torch.Tensor:
    """Official I2V post-step: pull the mean/std of the first 4 latent frames toward those of frames 4..8, within
    clamps, per sample. Needs at least 5 latent frames (otherwise there is no reference and latents are returned)."""
    t = latents.shape[1]
    if t <= FIRST_FRAMES:
        return latents
    out = latents.clone()
    src = latents[:, :FIRST_FRAMES].float()
    ref = latents[:, FIRST_FRAMES:FIRST_FRAMES + min(REFERENCE_FRAMES, t - 1)].float()
    dims = tuple(range(1, latents.ndim))
    src_mean, src_std = src.mean(dims, keepdim=True), src.std(dims, keepdim=True)
    ref_mean = torch.clamp(ref.mean(dims, keepdim=True), src_mean - MEAN_CLAMP[0], src_mean + MEAN_CLAMP[1])
    ref_std = torch.clamp(ref.std(dims, keepdim=True), src_std - STD_CLAMP[0], src_std + STD_CLAMP[1])
    out[:, :FIRST_FRAMES] = ((src - src_mean) / src_std * ref_std + ref_mean).to(latents.dtype)
    return out


def initial_noise(
    latent_shape: Sequence[int], seed: int | None = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard normal fp32 noise from a CPU generator: the same seed gives the same bits on every device."""
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed or 0))
    return torch.randn(tuple(latent_shape), generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    *,
    latent_shape: Sequence[int],
    cond: Any,
    uncond: Any = None,
    guidance_scale: float = 5.0,
    num_steps: int = 50,
    shift: float = 10.0,
    scale_factor: Sequence[float] = (1.0, 2.0, 2.0),
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    first_frame_latent: torch.Tensor | None = None,
    edit_latent: torch.Tensor | None = None,
    normalize_i2v: bool = True,
    batched_cfg: bool = True,
    sparse_params: dict | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    timesteps: Sequence[float] | None = None,
    magcache: MagCache | None = None,
) -> torch.Tensor:
    """Generate latents (B, T, H, W, 16) in fp32 with the official Euler grid.

    cond/uncond: :class:`TextCondition` or (embeds, mask, pooled). ``uncond`` None or ``guidance_scale == 1`` runs a
    single branch. ``first_frame_latent`` (B, 1, H, W, 16) turns on I2V: it fills the condition channels (mask 1 on
    frame 0) and is written into frame 0 of the state every step; ``normalize_i2v`` applies the official post-step.
    The state and the Euler update stay fp32; ``dtype`` (default: the model's) is only what the model sees.
    ``edit_latent`` (B, 1, H, W, 16) turns on instruct editing (report §6.3.1): the source image's latent fills the
    condition channels with mask ones on every step (both CFG branches) and is never written into the state.
    ``timesteps`` (1 → 0, num_steps + 1 values) replaces the shifted grid: a TSCD model's saved segment boundaries.
    ``magcache`` (a :class:`k5model.magcache.MagCache` for ``num_steps``) caches the visual stack; the CFG branches
    then run as two sequential forwards so each keeps its own cache state.
    """
    if len(latent_shape) != 5:
        raise ValueError(f"latent_shape must be (B, T, H, W, C), got {tuple(latent_shape)}")
    device = model.device
    cond = as_text_condition(cond)
    use_cfg = uncond is not None and guidance_scale != 1.0
    if magcache is not None:
        batched_cfg = False
        if magcache.num_steps != num_steps:
            raise ValueError(f"magcache was built for {magcache.num_steps} steps, sampling runs {num_steps}")
    text = cfg_batch(cond, as_text_condition(uncond)) if use_cfg and batched_cfg else cond
    text = TextCondition(*(None if x is None else x.to(device) for x in text))
    other = as_text_condition(uncond) if use_cfg and not batched_cfg else None
    if other is not None:
        other = TextCondition(*(None if x is None else x.to(device) for x in other))

    x = (noise.float() if noise is not None else initial_noise(latent_shape, seed, generator)).to(device)
    first = None
    if first_frame_latent is not None:
        first = first_frame_latent.float().to(device)
        if first.ndim == 4:
            first = first[:, None]
        if first.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(f"first_frame_latent has shape {tuple(first.shape)}, "
                             f"expected {(x.shape[0], 1, *x.shape[2:])}")
        x[:, :1] = first
    visual_cond = getattr(model, "visual_cond", False)
    if first is not None and not visual_cond:
        raise ValueError("image-to-video needs a model with visual_cond channels")
    source = None
    if edit_latent is not None:
        source = edit_latent.float().to(device)
        if first is not None or not visual_cond or source.shape != (x.shape[0], 1, *x.shape[2:]) or x.shape[1] != 1:
            raise ValueError(f"edit_latent {tuple(source.shape)} needs an image latent {tuple(x.shape)} of its shape, "
                             "a visual_cond model and no first_frame_latent")

    grid = sampling_grid(num_steps, shift) if timesteps is None else explicit_grid(timesteps, num_steps)
    with ExitStack() as stack:
        if magcache is not None:
            from k5model.magcache import magcache_applied

            stack.enter_context(magcache_applied(model, magcache))
        for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
            t, t_next = grid[i], grid[i + 1]
            # one latent frame: the edit source fills the whole condition with mask ones
            model_in = visual_condition(x, first if source is None else source) if visual_cond else x
            hook = None if magcache is None else (lambda branch, step=i: magcache.begin(step, branch))
            v = guided_velocity(model, model_in, t, text, guidance_scale if use_cfg else 1.0, batched_cfg=batched_cfg,
                                uncond=other, scale_factor=scale_factor, sparse_params=sparse_params, dtype=dtype,
                                branch_hook=hook)
            x = x + (t_next - t).to(device) * v
            if first is not None:
                x[:, :1] = first  # the given frame is not generated
    if first is not None and normalize_i2v:
        x = normalize_first_frames(x)
    return x

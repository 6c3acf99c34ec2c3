"""Random weights and inputs for CrossDiT tests and benchmarks: no data and no checkpoint, reproducible from a seed.

Everything is drawn on the CPU from its own ``torch.Generator`` and then moved, so a seed gives the same numbers on
any device and the global RNG is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from k5model.config import CrossDiTConfig
from k5model.flow_matching import rope_positions

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def randomize(module: ModuleT, std: float = 0.02, seed: int = 0) -> ModuleT:
    """N(0, std) for every parameter, the zero-initialised modulations included (so no block is an identity and the
    output depends on time and text); returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device="cpu") * std)  # cpu even inside torch.device(...)
    return module


def forward_inputs(
    cfg: CrossDiTConfig,
    frames: int,
    height: int,
    width: int,
    text_len: int,
    *,
    batch: int = 1,
    timestep: float | Sequence[float] = 700.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Keyword arguments of one CrossDiT (or diffusers ``Kandinsky5Transformer3DModel``) forward: random
    ``(batch, frames, height, width)`` latents, ``text_len`` text states and pooled vectors in ``dtype``, RoPE positions
    for the config's patch, spatial RoPE scale 2 (the 512-class models'). ``timestep`` (t·1000) is one value for every
    sample or one per sample; it stays fp32."""
    steps = [float(timestep)] * batch if isinstance(timestep, int | float) else [float(t) for t in timestep]
    if len(steps) != batch:
        raise ValueError(f"forward_inputs got {len(steps)} timesteps for a batch of {batch}")
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    latent_shape = (batch, frames, height, width, cfg.visual_embed_dim)
    return dict(
        hidden_states=rand(*latent_shape),
        encoder_hidden_states=rand(batch, text_len, cfg.in_text_dim),
        timestep=torch.tensor(steps, device=device),
        pooled_projections=rand(batch, cfg.in_text_dim2),
        visual_rope_pos=rope_positions(latent_shape, cfg.patch_size, device),
        text_rope_pos=torch.arange(text_len, device=device),
        scale_factor=(1.0, 2.0, 2.0),
    )

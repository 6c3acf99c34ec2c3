"""How a CrossDiT computes, apart from its weights and config: typed, immutable options set through
:meth:`k5model.crossdit.CrossDiT.set_options`.

A config (``CrossDiTConfig``) describes the network and travels with its checkpoint; these options describe one
process's way of running it (kernel backend, numerics, benchmark-only NABLA knobs) and are never saved.

    model.set_options(residual_dtype=torch.float32)
    model.set_options(attention=AttentionOptions(backend="math", rope_cast=torch.bfloat16))
    with model.options_applied(nabla=NablaOptions(force_density=0.1, force_total=True)):
        model(**inputs)  # restored afterwards
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from k5model.attention import BACKENDS as ATTENTION_BACKENDS


@dataclass(frozen=True, kw_only=True)
class AttentionOptions:
    """Which kernels the attention layers use and how rotated q/k are rounded."""

    backend: str = "sdpa"
    """"sdpa" (cuDNN / flash / memory-efficient SDPA; NABLA through FlexAttention on CUDA), "flex" (FlexAttention
    document masks for packed batches) or "math" (fp32 reference; NABLA through a dense masked SDPA)."""
    rope_cast: torch.dtype | None = None
    """None keeps rotated q/k in fp32 like the official code; torch.bfloat16 reproduces diffusers bit-for-bit."""

    def __post_init__(self) -> None:
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {self.backend!r} is not one of {ATTENTION_BACKENDS}")
        if self.rope_cast is not None and not self.rope_cast.is_floating_point:
            raise ValueError(f"rope_cast must be a floating dtype or None, got {self.rope_cast}")


@dataclass(frozen=True, kw_only=True)
class NablaOptions:
    """Benchmark knobs of NABLA attention (see ``k5model.nabla.nabla_block_mask``); defaults run the model's rule."""

    force_density: float | None = None
    """Keep the top ``force_density`` fraction of blocks in every row instead of the cumulative-mass rule (random
    weights give flat maps that would keep almost everything)."""
    force_total: bool = False
    """Count the STA blocks inside the forced density (a total density) rather than adding them on top."""
    track_density: bool = False
    """Record the mean block density of each forward in ``CrossDiT.last_nabla_density`` (synchronises the GPU)."""

    def __post_init__(self) -> None:
        if self.force_density is not None and not 0.0 < self.force_density <= 1.0:
            raise ValueError(f"force_density must be in (0, 1] or None, got {self.force_density}")
        if self.force_total and self.force_density is None:
            raise ValueError("force_total=True counts STA blocks inside a forced density: set force_density too")


@dataclass(frozen=True, kw_only=True)
class CrossDiTOptions:
    """Every runtime knob of a CrossDiT."""

    attention: AttentionOptions = field(default_factory=AttentionOptions)
    """Attention backend and q/k rounding."""
    residual_dtype: torch.dtype | None = None
    """dtype of the residual streams (text and visual) between blocks; None = the activations' dtype. torch.float32
    removes bf16 rounding of the running sum, the largest error source of a bf16 forward, for element-wise traffic."""
    nabla: NablaOptions = field(default_factory=NablaOptions)
    """Forced densities and density tracking (benchmarks on random weights)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward (``torch.utils.checkpoint``, non-reentrant)."""

    def __post_init__(self) -> None:
        if self.residual_dtype is not None and not self.residual_dtype.is_floating_point:
            raise ValueError(f"residual_dtype must be a floating dtype or None, got {self.residual_dtype}")
        for name, kind in (("attention", AttentionOptions), ("nabla", NablaOptions)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"CrossDiTOptions.{name} must be a {kind.__name__}, got {getattr(self, name)!r}")

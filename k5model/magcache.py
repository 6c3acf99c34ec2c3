"""MagCache (report §7.2; Ma et al. 2025) for the CrossDiT sampler: skip the whole visual block stack on steps where the
residual it adds is predicted to barely change, and reuse the residual cached on the last computed step.

How it works (the official Kandinsky 5 inference and the MagCache reference agree on this):

- Text blocks always run; only the visual stack is cached. Its residual r_i = out − in is kept per CFG branch
  (``cond`` / ``uncond``): the two branches see different text, so their residuals differ and never share a state.
- A calibration run computes every step and records, per branch and step, the magnitude ratio
  mean_tokens(‖r_i‖ / ‖r_{i−1}‖) (1.0 on the first step). Ratios depend on the checkpoint and the sampling setting.
- Cached inference: the first ``retention_ratio`` of the steps always compute. After that, per branch, multiply the
  step's ratio into an accumulated ratio and add |1 − accumulated ratio| to an accumulated error; while the error stays
  below ``threshold`` and at most ``max_skip_steps`` steps in a row were skipped, the step is skipped: the stack's
  output is its input plus the cached residual, added exactly once. Otherwise the step computes, refreshes the cached
  residual and resets the accumulators.

The stack is swapped for a caching wrapper only inside :func:`magcache_applied` (the model's parameters and key names
never change). Branches run as two sequential forwards while caching is on, so each branch decides on its own.
MagCache is meant for many-step sampling; the 16-NFE distilled model samples without it (see ``k5model.distill``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

BRANCHES = ("cond", "uncond")


@dataclass(frozen=True, kw_only=True)
class MagCacheConfig:
    """Cached-inference knobs; defaults are the official Kandinsky 5 ones (official_code_notes.md, MagCache)."""

    threshold: float = 0.12
    """Skip while the accumulated error Σ|1 − Π ratio| since the last computed step stays below this."""
    max_skip_steps: int = 2
    """At most this many consecutive skipped steps per branch."""
    retention_ratio: float = 0.2
    """The first ``retention_ratio · num_steps`` steps always compute (the early steps shape the layout)."""

    def __post_init__(self) -> None:
        if self.threshold < 0 or self.max_skip_steps < 0 or not 0.0 <= self.retention_ratio <= 1.0:
            raise ValueError(f"invalid MagCacheConfig {self}: threshold >= 0, max_skip_steps >= 0 and "
                             "0 <= retention_ratio <= 1 are required")


def resample_ratios(ratios: Sequence[float], num_steps: int) -> list[float]:
    """Nearest-neighbour resampling of one branch's per-step ratios to ``num_steps`` steps (the MagCache reference
    does the same when the step count differs from the calibration run)."""
    if not ratios:
        raise ValueError("ratios is empty: run a MagCache calibration first")
    n = len(ratios)
    if n == num_steps:
        return [float(r) for r in ratios]
    return [float(ratios[min(n - 1, round(i * (n - 1) / max(num_steps - 1, 1)))]) for i in range(num_steps)]


@dataclass
class BranchState:
    """What one CFG branch remembers between steps."""

    residual: torch.Tensor | None = None
    accumulated_ratio: float = 1.0
    accumulated_error: float = 0.0
    consecutive_skips: int = 0
    calibration: list[float] = field(default_factory=list)
    calibration_std: list[float] = field(default_factory=list)


class MagCache:
    """State of one sampling run. ``ratios`` {branch: per-step ratios} from :func:`calibrate` turns caching on;
    ``calibrate=True`` instead computes every step and records the ratios."""

    def __init__(self, num_steps: int, *, ratios: dict[str, Sequence[float]] | None = None,
                 config: MagCacheConfig | None = None, calibrate: bool = False):
        if ratios is None and not calibrate:
            raise ValueError("MagCache needs the calibrated mag ratios of this checkpoint (or calibrate=True)")
        self.num_steps = int(num_steps)
        self.config = config or MagCacheConfig()
        self.calibrating = calibrate
        self.ratios = {b: resample_ratios(r, self.num_steps) for b, r in (ratios or {}).items()}
        self.states = {b: BranchState() for b in BRANCHES}
        self.step, self.branch = 0, "cond"
        self.computed = 0
        self.skipped = 0

    def begin(self, step: int, branch: str) -> None:
        """Called by the sampler before each branch's forward."""
        if branch not in self.states:
            raise ValueError(f"unknown CFG branch {branch!r}; expected one of {BRANCHES}")
        self.step, self.branch = int(step), branch

    def should_skip(self) -> bool:
        """The skip decision for the current (step, branch); updates that branch's accumulators."""
        state = self.states[self.branch]
        if self.calibrating or state.residual is None or self.step < int(self.config.retention_ratio * self.num_steps):
            return False
        ratios = self.ratios.get(self.branch)
        if ratios is None:
            raise ValueError(f"no MagCache ratios for branch {self.branch!r}; calibrate with guidance on")
        state.accumulated_ratio *= ratios[self.step]
        state.accumulated_error += abs(1.0 - state.accumulated_ratio)
        state.consecutive_skips += 1
        if state.accumulated_error < self.config.threshold and state.consecutive_skips <= self.config.max_skip_steps:
            return True
        state.accumulated_ratio, state.accumulated_error, state.consecutive_skips = 1.0, 0.0, 0
        return False

    def store(self, residual: torch.Tensor) -> None:
        """Keep a freshly computed residual (and, when calibrating, its magnitude ratio to the previous one)."""
        state = self.states[self.branch]
        if self.calibrating:
            if state.residual is None:
                state.calibration.append(1.0)
                state.calibration_std.append(0.0)
            else:
                ratio = residual.float().norm(dim=-1) / state.residual.float().norm(dim=-1).clamp_min(1e-12)
                state.calibration.append(ratio.mean().item())
                state.calibration_std.append(ratio.std().item() if ratio.numel() > 1 else 0.0)
        state.residual = residual

    def calibrated_ratios(self) -> dict[str, list[float]]:
        """{branch: per-step ratios} recorded by a calibration run (branches that ran at least once)."""
        return {b: list(s.calibration) for b, s in self.states.items() if s.calibration}

    def stats(self) -> dict[str, Any]:
        total = self.computed + self.skipped
        return {"computed_stack_calls": self.computed, "skipped_stack_calls": self.skipped,
                "skip_fraction": self.skipped / total if total else 0.0, **asdict(self.config)}


class CachedVisualStack(nn.Module):
    """Stand-in for ``visual_transformer_blocks`` during cached sampling: runs the original blocks through the model's
    own block call (activation checkpointing etc. unchanged) or returns input + the branch's cached residual."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, cache: MagCache):
        super().__init__()
        self._model = [model]  # a list, so the model is not registered as a child module
        self.blocks = blocks
        self.cache = cache

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        cache = self.cache
        if cache.should_skip():
            cache.skipped += 1
            return x + cache.states[cache.branch].residual
        out = x
        for block in self.blocks:
            out = self._model[0]._block(block, out, *args)
        cache.computed += 1
        cache.store(out - x)
        return out


@contextmanager
def magcache_applied(model: nn.Module, cache: MagCache) -> Iterator[MagCache]:
    """Within the block, ``model``'s visual stack is the caching wrapper; the original blocks are restored after."""
    blocks = model.visual_transformer_blocks
    if isinstance(blocks, nn.ModuleList) and len(blocks) == 1 and isinstance(blocks[0], CachedVisualStack):
        raise RuntimeError("MagCache is already applied to this model")
    model.visual_transformer_blocks = nn.ModuleList([CachedVisualStack(model, blocks, cache)])
    try:
        yield cache
    finally:
        model.visual_transformer_blocks = blocks


def calibration_record(cache: MagCache, *, shift: float, latent_shape: Sequence[int],
                       guidance_scale: float) -> dict[str, Any]:
    """The JSON-able calibration of one checkpoint and sampling setting (what a pipeline folder stores)."""
    return {"num_steps": cache.num_steps, "shift": float(shift), "latent_shape": [int(s) for s in latent_shape],
            "guidance_scale": float(guidance_scale), "mag_ratios": cache.calibrated_ratios(),
            "mag_ratios_std": {b: list(s.calibration_std) for b, s in cache.states.items() if s.calibration}}

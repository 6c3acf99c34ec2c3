"""Sampling settings that travel with a pipeline folder (``sampling_config.json`` beside ``model_index.json``): NFE,
guidance, shift, a distilled model's segment boundaries and a checkpoint's MagCache calibration. ``K5Pipeline`` and
``k5 generate`` use them as defaults, so a released Flash folder samples with its own 16-step grid and guidance 1."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from k5model.magcache import MagCache, MagCacheConfig

SAMPLING_CONFIG = "sampling_config.json"


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How a checkpoint is meant to be sampled."""

    kind: str = "base"
    """What the checkpoint is: base | cfg_distilled | tscd | flash."""
    num_steps: int = 50
    """NFE per branch (sampling steps)."""
    guidance_scale: float = 5.0
    """CFG scale; 1.0 for distilled models (one forward per step)."""
    shift: float = 10.0
    """Grid shift s of t ← s·t/(1+(s−1)·t)."""
    timesteps: tuple[float, ...] | None = None
    """TSCD segment boundaries (num_steps + 1 values 1 → 0); the sampler visits exactly these."""
    magcache: dict[str, Any] | None = None
    """MagCache calibration ({"mag_ratios": {branch: [...]}, ...} from ``magcache.calibration_record``) plus optional
    "config" (MagCacheConfig fields); None: sampled without caching. Never set for segment-boundary models."""

    def __post_init__(self) -> None:
        if self.timesteps is not None and len(self.timesteps) != self.num_steps + 1:
            raise ValueError(f"timesteps has {len(self.timesteps)} values, num_steps={self.num_steps} needs "
                             f"{self.num_steps + 1}")
        if self.timesteps is not None and self.magcache is not None:
            raise ValueError("MagCache is off for segment-boundary (TSCD/Flash) models: drop magcache or timesteps")
        if self.magcache is not None and not self.magcache.get("mag_ratios"):
            raise ValueError("magcache settings carry no mag_ratios; run the magcache_calibration first")

    def build_magcache(self, num_steps: int | None = None) -> MagCache | None:
        """The MagCache for one sampling run, or None when this checkpoint samples without it."""
        if self.magcache is None:
            return None
        config = MagCacheConfig(**self.magcache.get("config", {}))
        return MagCache(num_steps or self.num_steps, ratios=self.magcache["mag_ratios"], config=config)

    def diffusers_call_kwargs(self) -> dict[str, Any]:
        """Arguments of diffusers' ``Kandinsky5T2VPipeline.__call__`` that sample this checkpoint with its own step
        count and guidance (diffusers reads only ``model_index.json`` and the components, not this file). Its
        FlowMatchEuler scheduler builds the shifted grid itself (same shift, from the folder's scheduler config) but
        ends its linear ramp at σ=1/1000, so its points differ slightly from the saved segment boundaries that
        ``K5Pipeline`` / ``k5 generate`` visit exactly; it has no MagCache."""
        return {"num_inference_steps": self.num_steps, "guidance_scale": self.guidance_scale}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["timesteps"] = None if self.timesteps is None else list(self.timesteps)
        return d


def write_sampling_settings(pipeline_dir: str | Path, settings: SamplingSettings) -> Path:
    path = Path(pipeline_dir) / SAMPLING_CONFIG
    path.write_text(json.dumps(settings.to_json(), indent=2))
    return path


def read_sampling_settings(pipeline_dir: str | Path) -> SamplingSettings | None:
    """The folder's settings, or None when it has none (a plain pre-trained pipeline)."""
    path = Path(pipeline_dir) / SAMPLING_CONFIG
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("timesteps") is not None:
            raw["timesteps"] = tuple(float(t) for t in raw["timesteps"])
        return SamplingSettings(**raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid sampling settings ({e}); re-export the pipeline folder") from e

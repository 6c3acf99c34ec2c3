"""Distillation stages as one call each, from a pipeline folder to a complete pipeline folder (what the Dagster assets
``cfg_distilled``, ``tscd_16nfe``, ``flash`` and ``magcache_calibration`` wrap).

Each stage: load the upstream folder's transformer (frozen teacher), encode the stage's prompts and the null prompt
with the folder's own text encoders, build the distillation set (the teacher's guided samples of those prompts; a
production run points ``DistillSet`` at the curated latent shards instead), train, save the transformer, assemble the
pipeline folder (frozen parts linked from the base folder) and write its ``sampling_config.json``. Each also
measures its latent MSE to the base model's guided reference at fixed held-out seeds, so the lineage records the
demo-scale acceptance numbers with every materialization.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from k5model.checkpoint import assemble_pipeline_folder, replace_dir, save_transformer_folder
from k5model.crossdit import CrossDiT
from k5model.distill.adversarial import AdversarialConfig, TeacherFeatureDiscriminator, train_adversarial
from k5model.distill.cfg_distill import CFGDistillConfig, train_cfg_distill
from k5model.distill.common import DistillSet, frozen_copy, latent_mse, sample_set, stack_text
from k5model.distill.settings import SamplingSettings, read_sampling_settings, write_sampling_settings
from k5model.distill.tscd import TSCDConfig, train_tscd
from k5model.flow_matching import TextCondition
from k5model.magcache import MagCache, MagCacheConfig, calibration_record
from k5model.sampling import sample

KINDS = ("cfg_distilled", "tscd", "flash", "magcache_calibration")


@dataclass(frozen=True, kw_only=True)
class DistillStageSpec:
    """What one distillation stage does (demo-scale defaults)."""

    kind: str
    """cfg_distilled | tscd | flash | magcache_calibration."""
    prompts: tuple[str, ...] = ("a corgi running on a beach", "a red car in the rain", "a city street at night")
    """Captions of the distillation set and of the comparison."""
    train_seeds: int = 4
    """Teacher samples per prompt in the distillation set."""
    eval_seeds: tuple[int, ...] = (0,)
    """Held-out seeds of the comparison with the base model's guided reference."""
    latent_grid: tuple[int, int, int] = (2, 16, 16)
    """(T, H, W) latents; 16×16 keeps whole NABLA tiles for 10 s (NABLA) checkpoints."""
    shift: float = 10.0
    """Sampling shift (video default)."""
    guidance_scale: float = 5.0
    """Teacher guidance (CFG distillation) and the reference's."""
    reference_steps: int = 100
    """NFE per branch of the guided reference (and of MagCache calibration)."""
    data_steps: int = 10
    """NFE of the teacher samples making up the distillation set."""
    num_steps: int | None = None
    """The exported model's NFE: 50 (cfg_distilled, magcache_calibration), 16 (tscd, flash) when unset."""
    train_steps: int = 20
    """Optimiser steps."""
    lr: float = 1e-3
    """Learning rate (cfg_distilled, tscd; flash uses the report's RMSprop rates)."""
    batch_size: int = 4
    """Samples per step."""
    magcache: MagCacheConfig = MagCacheConfig()
    """Knobs stored with a MagCache calibration."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown distillation stage kind {self.kind!r}; use one of {KINDS}")

    @property
    def nfe(self) -> int:
        return self.num_steps or (16 if self.kind in ("tscd", "flash") else 50)


def _encode(pipeline_dir: Path, prompts: Sequence[str]) -> tuple[list[TextCondition], TextCondition]:
    from k5model.pipeline import K5Pipeline

    pipe = K5Pipeline.from_pretrained(pipeline_dir)
    conds = [pipe.encode_text(p) for p in prompts]
    return conds, pipe.encode_text("")  # the null prompt of CFG distillation


def _export(student: CrossDiT, base: Path, out: Path, settings: SamplingSettings, metrics: dict[str, Any]
            ) -> Path:
    """Build the folder beside ``out`` (settings and metrics included) and swap it in: ``out`` is the previous
    complete export until the new one is complete (the relative links stay valid: same parent folder)."""
    staging = out.parent / f".{out.name}.staging"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        save_transformer_folder(student, Path(tmp) / "transformer")
        assemble_pipeline_folder(base, Path(tmp) / "transformer", staging)
    write_sampling_settings(staging, settings)
    (staging / "distill_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return replace_dir(staging, out)


def run_distill_stage(spec: DistillStageSpec, *, base_dir: str | Path, upstream_dir: str | Path,
                      out_dir: str | Path, on_step: Callable[[int, dict[str, float]], None] | None = None
                      ) -> dict[str, Any]:
    """Run one stage: ``base_dir`` = the pre-trained (guided) model, the reference and the adversarial teacher;
    ``upstream_dir`` = the model this stage starts from (the base for cfg_distilled and magcache_calibration, the
    CFG-distilled folder for tscd, the TSCD folder for flash). Writes a complete pipeline folder to ``out_dir``;
    returns metrics and settings."""
    torch.manual_seed(0)
    base_dir, upstream_dir, out = Path(base_dir), Path(upstream_dir), Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = frozen_copy(CrossDiT.from_pretrained(base_dir).float())
    upstream = frozen_copy(CrossDiT.from_pretrained(upstream_dir).float())
    prompts, null = _encode(base_dir, spec.prompts)
    shape = (*spec.latent_grid, int(base.config.in_visual_dim))
    kw = dict(shape=shape, shift=spec.shift)
    reference = sample_set(base, prompts, spec.eval_seeds, num_steps=spec.reference_steps,
                           guidance_scale=spec.guidance_scale, null=null, **kw)
    train_seeds = range(1000, 1000 + spec.train_seeds)
    data = DistillSet(sample_set(base, prompts, train_seeds, num_steps=spec.data_steps,
                                 guidance_scale=spec.guidance_scale, null=null, **kw),
                      stack_text([p for p in prompts for _ in train_seeds]))
    result: dict[str, Any] = {"kind": spec.kind, "nfe": spec.nfe, "base_dir": str(base_dir),
                              "upstream_dir": str(upstream_dir)}
    upstream_settings = read_sampling_settings(upstream_dir)
    student = copy.deepcopy(upstream).requires_grad_(True)
    if spec.kind == "cfg_distilled":
        result["undistilled_nocfg_mse"] = latent_mse(sample_set(base, prompts, spec.eval_seeds, num_steps=spec.nfe,
                                                                **kw), reference)
        history = train_cfg_distill(student, base, data, null, CFGDistillConfig(
            guidance_scale=spec.guidance_scale, steps=spec.train_steps, lr=spec.lr, shift=spec.shift,
            batch_size=spec.batch_size), on_step)
        settings = SamplingSettings(kind="cfg_distilled", num_steps=spec.nfe, guidance_scale=1.0, shift=spec.shift)
    elif spec.kind == "tscd":
        result["upstream_at_nfe_mse"] = latent_mse(sample_set(upstream, prompts, spec.eval_seeds, num_steps=spec.nfe,
                                                              **kw), reference)
        boundaries, history = train_tscd(student, upstream, data, TSCDConfig(
            num_steps=spec.nfe, shift=spec.shift, steps=spec.train_steps, lr=spec.lr, batch_size=spec.batch_size),
            on_step)
        settings = SamplingSettings(kind="tscd", num_steps=spec.nfe, guidance_scale=1.0, shift=spec.shift,
                                    timesteps=tuple(boundaries))
    elif spec.kind == "flash":
        if upstream_settings is None or upstream_settings.timesteps is None:
            raise ValueError(f"flash starts from a TSCD folder with segment boundaries; {upstream_dir} has none")
        disc = TeacherFeatureDiscriminator(base)
        history = train_adversarial(student, disc, data, upstream_settings.timesteps, AdversarialConfig(
            steps=spec.train_steps, batch_size=spec.batch_size), on_step)
        settings = replace(upstream_settings, kind="flash")
    else:
        calib = MagCache(spec.reference_steps, calibrate=True)
        sample(base, latent_shape=(1, *shape), cond=prompts[0], uncond=null, seed=4242,
               guidance_scale=spec.guidance_scale, num_steps=spec.reference_steps, shift=spec.shift, progress=False,
               magcache=calib)
        record = calibration_record(calib, shift=spec.shift, latent_shape=(1, *shape),
                                    guidance_scale=spec.guidance_scale)
        record["config"] = asdict(spec.magcache)
        settings = SamplingSettings(kind="base", num_steps=spec.reference_steps, guidance_scale=spec.guidance_scale,
                                    shift=spec.shift, magcache=record)
        cached, computed = [], 0
        for cond in prompts:
            for seed in spec.eval_seeds:
                cache = settings.build_magcache()
                cached.append(sample(base, latent_shape=(1, *shape), cond=cond, uncond=null, seed=seed,
                                     guidance_scale=spec.guidance_scale, num_steps=spec.reference_steps,
                                     shift=spec.shift, progress=False, magcache=cache))
                computed += cache.computed
        result["magcache_stack_calls_per_sample"] = computed / len(cached)
        result["stack_calls_per_sample_uncached"] = 2 * spec.reference_steps
        history = []
    student.eval()
    if spec.kind == "magcache_calibration":
        result["mse_to_guided_reference"] = latent_mse(torch.cat(cached), reference)
    else:
        result["mse_to_guided_reference"] = latent_mse(sample_set(
            student, prompts, spec.eval_seeds, num_steps=settings.num_steps, timesteps=settings.timesteps,
            guidance_scale=settings.guidance_scale, null=null, **kw), reference)
    result.update({"pipeline_dir": str(out), "steps_trained": len(history),
                   "final_loss": (history[-1].get("loss", history[-1].get("g_loss")) if history else None),
                   "sampling": settings.to_json()})
    _export(student, base_dir, out, settings, result)  # frozen parts linked from the base, not a chain of links
    return result

"""One typed training-job spec: what ``k5 train``, the Dagster stage assets and the Kubernetes pod all hand to the
trainer (torchtitan style: kw-only dataclasses, a docstring under every field, validated on construction).

The field docstrings are the help text of the CLI (``k5cli.train`` generates one option per field, ``--field-name``),
so a field added here is an option everywhere at once. Field names are unique across sections for that reason.
``TrainJob.to_json`` / ``from_json`` carry a job across processes (Pipes subprocess, torchrun workers, pods).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass, field
from functools import cache
from typing import Any

RES_CLASSES = ("low", "medium", "high")  # latent shard classes (k5data.latents): short side 256 / 512 / 1024 px


def parse_mix(text: str) -> dict[str, float]:
    """``"t2v=0.8,i2v=0.2"`` -> {"t2v": 0.8, "i2v": 0.2}."""
    try:
        return {k.strip(): float(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError as err:
        raise ValueError(f"task mix {text!r} is not 'task=p,task=p' (e.g. t2v=0.8,i2v=0.2)") from err


@dataclass(kw_only=True)
class StageSpec:
    """Which stage trains, and overrides of its configuration."""

    stage: str = "tiny_demo"
    """A report Table 4 stage name (``k5 stages``) or ``tiny_demo``."""
    demo: bool = False
    """Scale a Table 4 stage to the tiny preset so it trains on a CPU."""
    steps: int | None = None
    """Train until this optimiser step (default: the stage's own step count)."""
    seed: int | None = None
    """Seed of weights and of every per-step draw (default: the stage's)."""
    preset: str | None = None
    """Model preset instead of the stage's (e.g. video_lite on GPUs)."""
    latent_size: str | None = None
    """HxW latent size of every synthetic sample, e.g. 64x96 for 512x768 pixels."""
    frames: int | None = None
    """Latent frames of a video sample (31 = 5 s at 24 fps)."""
    batch: int | None = None
    """Samples per rank and step."""
    lr: float | None = None
    """Peak learning rate instead of the stage's (SFT: 1e-5 for images, report §6.4)."""
    tasks: str | None = None
    """Task mix override, e.g. t2v=0.8,i2v=0.2."""
    bf16: bool = False
    """bf16 autocast (parameters gathered in bf16 under FSDP on CUDA)."""
    attention: str | None = None
    """Attention instead of the stage's (regular | nabla), e.g. regular where latents are too small for NABLA's
    8x8-token tiles."""

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.latent_size is not None:
            parts = self.latent_size.lower().split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"latent_size {self.latent_size!r} is not HxW (e.g. 64x96)")
        if self.tasks is not None:
            parse_mix(self.tasks)
        if self.attention not in (None, "regular", "nabla"):
            raise ValueError(f"attention {self.attention!r} is not regular or nabla")
        for name in ("frames", "batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class DataSpec:
    """Where the batches come from: latent shards in an object store, or synthetic latents (tests, benchmarks)."""

    shards: str | None = None
    """Train on the latent shards under this prefix of --store (k5 latents) instead of synthetic batches."""
    store: str | None = None
    """Object store of --shards: a folder, file:// or s3://bucket/prefix URI."""
    text_encoders: str | None = None
    """Pipeline folder whose Qwen/CLIP encoders embed the shard captions on the fly (with --shards)."""
    res_classes: str | None = None
    """Comma-separated shard resolution classes to read (low, medium, high); default: every class."""
    t_max: int | None = None
    """Latent frames packed per step and rank (with --shards; default batch x frames)."""
    text_len: int = 6
    """Text tokens of a synthetic sample's condition (256 = Qwen's maximum)."""
    prefetch: int = 32
    """Latent samples each shard stream reads ahead in a worker process, so object-store reads and tar unpacking
    overlap the training step (0 = read in the training process)."""

    def __post_init__(self) -> None:
        if self.shards is not None and (self.store is None or self.text_encoders is None):
            raise ValueError("shards needs store (where the shards are) and text_encoders (a pipeline folder with "
                             "text_encoder/ and text_encoder_2/)")
        bad = [c for c in self.classes() if c not in RES_CLASSES]
        if bad:
            raise ValueError(f"res_classes {bad} unknown; use {', '.join(RES_CLASSES)}")
        if self.t_max is not None and self.t_max < 1:
            raise ValueError(f"t_max must be >= 1, got {self.t_max}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 samples, got {self.prefetch}")

    def classes(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.res_classes.split(",") if c.strip()) if self.res_classes else ()


@dataclass(kw_only=True)
class ParallelSpec:
    """Processes and how the model is spread over them (FSDP2 / HSDP, activation checkpointing)."""

    nproc: int = 1
    """Processes (GPUs) of the job; more than one launches torchrun."""
    replicate: int = 1
    """HSDP: replica groups, each sharding the model over nproc/replicate ranks (1 = plain FSDP)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass."""
    offload_activations: bool = False
    """Activation checkpointing with each block's saved inputs in pinned host memory (report §6.1.3)."""
    sequence_parallel: int = 1
    """Ulysses sequence parallel: N consecutive ranks split each batch's visual tokens and attend the whole sequence
    for heads/N of the heads each (N divides the heads and nproc/replicate; 1 = off). For long videos."""

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.replicate < 1 or self.sequence_parallel < 1:
            raise ValueError(f"nproc, replicate and sequence_parallel must be >= 1, got {self.nproc}, "
                             f"{self.replicate} and {self.sequence_parallel}")
        if self.offload_activations:
            self.activation_checkpointing = True


@dataclass(kw_only=True)
class CheckpointSpec:
    """The run folder: sharded checkpoints (exact resume), metrics and the exported weights."""

    out: str = ""
    """Run folder (checkpoints/, metrics.jsonl, ema/, pipeline/)."""
    resume: bool = False
    """Continue from the newest checkpoint in the run folder, if there is one."""
    ckpt_every: int = 4
    """Save a sharded checkpoint every N steps (0 = only at the end)."""
    keep: int = 2
    """Checkpoints kept (older ones are deleted)."""
    async_checkpoint: bool = False
    """Save without blocking training: the sharded state is staged to host memory (the stall, logged as
    ckpt_stall_s), then written, checksummed and published by a background thread; a save only becomes resumable
    once complete."""
    export: bool = True
    """Write the EMA weights to ema/transformer (+ the official single file) at the end."""
    base_pipeline: str | None = None
    """Pipeline folder whose frozen parts (text encoders, tokenizers, VAE, scheduler) the export links into a complete
    pipeline/ folder beside the trained transformer."""

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out (the run folder) is required")
        if self.ckpt_every < 0 or self.keep < 1:
            raise ValueError(f"ckpt_every must be >= 0 and keep >= 1, got {self.ckpt_every} and {self.keep}")


@dataclass(kw_only=True)
class SampleSpec:
    """Sample generations from fixed validation prompts with the EMA weights during training."""

    sample_every: int | None = None
    """Generate every N steps and at the last step (0 = last step only; unset = never)."""
    sample_pipeline: str | None = None
    """Pipeline folder whose text encoders and VAE the samples use (its transformer is ignored)."""
    sample_prompts: str | None = None
    """Text file, one validation prompt a line (default: a few built-in prompts)."""
    sample_steps: int = 25
    """Sampler steps of a validation sample."""
    sample_cache: str | None = None
    """Folder keeping the validation prompts' text encodings across runs."""

    def __post_init__(self) -> None:
        if self.sample_every is not None and self.sample_pipeline is None:
            raise ValueError("sample_every needs sample_pipeline (the text encoders and VAE to generate with)")


@dataclass(kw_only=True)
class InitSpec:
    """Starting weights."""

    init: str | None = None
    """Start from these weights: a parent stage's ema/transformer, a diffusers transformer folder, or an official
    single file (ignored when resuming from a checkpoint)."""


DISTILL_KINDS = ("cfg_distilled", "tscd", "flash", "magcache_calibration")  # k5model.distill.export.KINDS


@dataclass(kw_only=True)
class DistillSpec:
    """A distillation stage instead of pre-training (report §6.5, §7.2; ``k5model.distill``): the job trains
    ``steps`` optimiser steps at ``lr`` and exports ``out/pipeline`` with its ``sampling_config.json``."""

    distill: str | None = None
    """Distillation stage to run: cfg_distilled | tscd | flash | magcache_calibration (unset: pre-training)."""
    distill_teacher: str | None = None
    """Pipeline folder of the guided base model: the reference, the CFG teacher and the adversarial features."""
    distill_from: str | None = None
    """Pipeline folder the student starts from (tscd: the CFG-distilled export; flash: the TSCD export); default:
    the teacher."""
    distill_reference_steps: int = 100
    """NFE per branch of the guided reference (and of the MagCache calibration)."""
    distill_seeds: int = 4
    """Teacher samples per prompt in the distillation set."""
    distill_latent_frames: int = 2
    """Latent frames T of the distillation latents (T x 16 x 16: whole NABLA tiles)."""

    def __post_init__(self) -> None:
        if self.distill is None:
            return
        if self.distill not in DISTILL_KINDS:
            raise ValueError(f"distill {self.distill!r} is not one of {', '.join(DISTILL_KINDS)}")
        if not self.distill_teacher:
            raise ValueError("distill needs distill_teacher (the guided base model's pipeline folder)")
        if min(self.distill_reference_steps, self.distill_seeds, self.distill_latent_frames) < 1:
            raise ValueError("distill_reference_steps, distill_seeds and distill_latent_frames must be >= 1")


SECTIONS = {"stage": StageSpec, "data": DataSpec, "parallel": ParallelSpec, "checkpoint": CheckpointSpec,
            "samples": SampleSpec, "init": InitSpec, "distill": DistillSpec}


@dataclass(kw_only=True)
class TrainJob:
    """Everything one training run needs; see the section classes for the fields."""

    stage: StageSpec = field(default_factory=StageSpec)
    data: DataSpec = field(default_factory=DataSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    checkpoint: CheckpointSpec
    samples: SampleSpec = field(default_factory=SampleSpec)
    init: InitSpec = field(default_factory=InitSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)

    # replicate is checked against the real world size when the mesh is built (parallel.training_mesh): under a
    # torchrun started by hand the launcher, not nproc, decides how many ranks there are.

    @classmethod
    def from_flat(cls, **values: Any) -> TrainJob:
        """From flat field values (the CLI's options); unknown names raise, naming them."""
        known = {name: section for section, spec in SECTIONS.items() for name in _field_names(spec)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown training-job fields {unknown}")
        parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for name, value in values.items():
            parts[known[name]][name] = value
        return cls(**{s: SECTIONS[s](**kw) for s, kw in parts.items()})

    def flat(self) -> dict[str, Any]:
        return {k: v for section in SECTIONS for k, v in dataclasses.asdict(getattr(self, section)).items()}

    def replace(self, **changes: Any) -> TrainJob:
        """A copy with flat fields changed (validated again)."""
        return TrainJob.from_flat(**{**self.flat(), **changes})

    def to_json(self) -> str:
        # a pre-training job leaves the unset distill section out (its JSON, e.g. in the k8s templates, is unchanged)
        return json.dumps({s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS
                           if s != "distill" or self.distill.distill is not None}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        data = json.loads(text)
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown training-job sections {unknown}; expected {list(SECTIONS)}")
        return cls(**{s: SECTIONS[s](**data.get(s, {})) for s in SECTIONS if s in data or s != "checkpoint"})


def _field_names(spec: type) -> list[str]:
    return [f.name for f in dataclasses.fields(spec)]


@cache
def field_docs(spec: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source: Python keeps none at run time)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(spec)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def job_fields() -> list[tuple[str, dataclasses.Field, str]]:
    """(section, field, docstring) of every field of every section, in declaration order."""
    out = []
    for section, spec in SECTIONS.items():
        docs = field_docs(spec)
        for f in dataclasses.fields(spec):
            if f.name not in docs:
                raise TypeError(f"{spec.__name__}.{f.name} has no docstring: every TrainJob field documents itself")
            out.append((section, f, docs[f.name]))
    return out

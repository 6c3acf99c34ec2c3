"""The report's analytic training model (§7.3): Eq. 1 step time, Eq. 2 GPU memory, and a batch/sharding planner.

Readings of the report's symbols (it prints the formulas without units):

* Eq. 1 ``S`` is the "video resolution" with S0 = 256 x 384 x 31: pixel height x pixel width x *latent* frames (31 =
  latent frames of a 121-frame 5 s clip). Only S/S0 enters, so any unit proportional to tokens gives the same value.
  The result is in arbitrary units (29·L·B at the reference); ``--ref-seconds`` converts it with one measured point.
* Eq. 2 ``S`` is the sequence length in visual tokens. We read the result as **bytes**: with
  P = L(9·d_t·d + 8·d² + 2·d_f·d) (the blocks' parameter count: 9d modulation from d_t, 8d² self+cross attention,
  2·d·d_f MLP), 12P/N is fp32 weights + Adam m, v sharded over N GPUs, 4P/N fp32 gradients, and 2S(L·d·o + 18d + 2d_f)
  bf16 activations (checkpointed block inputs unless offloaded, plus one block's recompute working set). This reading
  predicts 30.5 GiB for video_lite 5 s 512x768 on one GPU; we measured a 36.8 GB peak (docs/benchmarks.md).
* Eq. 2 has no batch term: we pass S = per-GPU micro-batch x tokens per sample.

No torch import of its own (the ``k5model`` package __init__ still imports torch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from k5model.config import get_preset
from k5model.training.stages import VAE_SPATIAL, TableStage, get_table_stage, latent_frames

D0 = 1792  # hidden dimension of the 2B model (report §7.3.1)
S0 = 256 * 384 * 31  # reference video resolution (report §7.3.1)
PATCH = (1, 2, 2)  # CrossDiT patch (t, h, w) of every preset

GIB = 2**30
# Usable memory of one "80 GB" H100 as nvidia-smi reports it (81559 MiB); "fits" compares against this.
H100_80GB_BYTES = 81559 * 2**20

# The measured reference point for --ref-seconds: video_lite, batch 1, 512x768, 5 s (31 latent frames), 1 H100,
# bf16 autocast + activation checkpointing: 6.30 s/step (docs/benchmarks.md, 2026-11-22).
REF_PRESET = "video_lite"
REF_HEIGHT, REF_WIDTH, REF_SECONDS_OF_VIDEO = 512, 768, 5
MEASURED_REF_SECONDS = 6.30


def step_time_units(d: int, S: float, L: int, B: float) -> float:
    """Eq. 1: Step = d/d0 · S/S0 · (9 + 14·S/S0 + 6·d/d0) · L · B (arbitrary units)."""
    rd, rs = d / D0, S / S0
    return rd * rs * (9 + 14 * rs + 6 * rd) * L * B


def block_params(L: int, d: int, d_t: int, d_f: int) -> int:
    """The term L(9·d_t·d + 8·d² + 2·d_f·d) shared by both halves of Eq. 2."""
    return L * (9 * d_t * d + 8 * d * d + 2 * d_f * d)


def memory_estimate(L: int, d: int, d_t: int, d_f: int, N: int, S: float, offload: bool) -> float:
    """Eq. 2, in bytes (our reading, see the module docstring):

    12·L(9·d_t·d + 8d² + 2·d_f·d)/N + max(4·L(9·d_t·d + 8d² + 2·d_f·d)/N, 2S(L·d·o + 18d + 2d_f)), o = 0 if offloaded.
    """
    o = 0 if offload else 1
    p = block_params(L, d, d_t, d_f)
    return 12 * p / N + max(4 * p / N, 2 * S * (L * d * o + 18 * d + 2 * d_f))


def video_resolution(height: int, width: int, frames: int) -> int:
    """Eq. 1's S: pixel height x pixel width x latent frames (S0 = 256·384·31)."""
    return height * width * frames


def sequence_length(height: int, width: int, frames: int) -> int:
    """Visual tokens of one sample: latent frames x (H/8/2) x (W/8/2)."""
    pt, ph, pw = PATCH
    return (frames // pt) * (height // VAE_SPATIAL // ph) * (width // VAE_SPATIAL // pw)


def reference_units() -> float:
    cfg = get_preset(REF_PRESET)
    return step_time_units(cfg.model_dim, video_resolution(REF_HEIGHT, REF_WIDTH, latent_frames(REF_SECONDS_OF_VIDEO)),
                           cfg.num_visual_blocks, 1)


@dataclass(frozen=True)
class Candidate:
    """One setting to evaluate: micro-batch per GPU, FSDP shard-group size, activation offloading."""

    batch_per_gpu: int
    shard_gpus: int
    offload: bool = False


@dataclass(frozen=True)
class PlanRow:
    candidate: Candidate
    grad_accum: int  # micro-steps per optimiser step to reach the stage's global batch
    effective_batch: int  # gpus · batch_per_gpu · grad_accum (>= the table's batch)
    step_units: float  # expected Eq. 1 units per optimiser step, per GPU (GPUs run in parallel)
    step_seconds: float | None  # step_units calibrated by the reference point, if given
    memory_gib: float  # Eq. 2 at the stage's largest sample, in GiB under the bytes reading
    fits: bool


def _samples(stage: TableStage) -> list[tuple[float, int, int, int]]:
    """(probability, height, width, latent frames) of every resolution x task combination of the stage."""
    out = []
    for key, p_res in stage.resolutions.items():
        h, w = (int(v) for v in key.split("x"))
        for task, p_task in stage.tasks.items():
            # t2i and edit samples are single images; video tasks are counted at the stage's maximum length.
            frames = stage.frames if task in ("t2v", "i2v") else 1
            out.append((p_res * p_task, h, w, frames))
    return out


def default_candidates(gpus: int) -> list[Candidate]:
    shards = sorted({s for s in (1, 8, gpus) if s <= gpus and gpus % s == 0})
    return [Candidate(b, s, off) for b in (1, 2, 4, 8) for s in shards for off in (False, True)]


def plan(stage: TableStage | str, gpus: int, candidates: Iterable[Candidate] | None = None, *,
         ref_seconds: float | None = None, capacity_bytes: float = H100_80GB_BYTES) -> list[PlanRow]:
    """Evaluate Eq. 1 and Eq. 2 for each candidate; rows in candidate order.

    Step time is the probability-weighted Eq. 1 over the stage's resolution x task mix (one draw per micro-batch, as
    ``SyntheticLatentSource`` does) times the gradient-accumulation count; memory is Eq. 2 at the largest sample, since
    that one must fit. Eq. 1 is dense attention: for NABLA stages it is an upper bound."""
    table = get_table_stage(stage) if isinstance(stage, str) else stage
    if gpus < 1:
        raise ValueError("gpus must be >= 1")
    cfg = get_preset(table.preset)
    d, L, d_t, d_f = cfg.model_dim, cfg.num_visual_blocks, cfg.time_dim, cfg.ff_dim
    samples = _samples(table)
    max_tokens = max(sequence_length(h, w, t) for _, h, w, t in samples)
    per_ref = ref_seconds / reference_units() if ref_seconds is not None else None
    rows = []
    for cand in (default_candidates(gpus) if candidates is None else candidates):
        if cand.batch_per_gpu < 1 or cand.shard_gpus < 1 or cand.shard_gpus > gpus:
            raise ValueError(f"invalid candidate {cand} for {gpus} GPUs")
        accum = math.ceil(table.batch / (gpus * cand.batch_per_gpu))
        micro = sum(p * step_time_units(d, video_resolution(h, w, t), L, cand.batch_per_gpu) for p, h, w, t in samples)
        units = micro * accum
        mem = memory_estimate(L, d, d_t, d_f, cand.shard_gpus, cand.batch_per_gpu * max_tokens, cand.offload)
        rows.append(PlanRow(cand, accum, gpus * cand.batch_per_gpu * accum, units,
                            None if per_ref is None else units * per_ref, mem / GIB, mem <= capacity_bytes))
    return rows

"""Per-step throughput metrics: tokens/s, model TFLOP/s, step time and peak memory, summed / maxed over ranks.

``ThroughputMeter`` is a pair of trainer callbacks (``meter`` first, ``meter.end`` last in ``Trainer.callbacks``) so the
step time covers the optimiser step only, not the checkpoint saves or sample generations that other callbacks do.
Every rank must run it: the counts are reduced across ranks, which is a collective.

Model FLOPs are the count our benchmarks import from here (``forward_flops``): matmuls and attention of the
visual blocks, 2 FLOPs per multiply-add, training = 3 x forward (no recompute counted), dense attention (for NABLA
stages the number is the dense equivalent, an upper bound of the work done).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from k5model.config import CrossDiTConfig
from k5model.training.batch import PackedBatch

GIB = 2**30


def forward_flops(cfg: CrossDiTConfig, tokens: int, text_len: int) -> float:
    """Matmul + attention FLOPs of one CrossDiT forward of one sample over the visual blocks."""
    d, f = cfg.model_dim, cfg.ff_dim
    per_block = 2 * tokens * (4 * d * d + 2 * d * f)  # self-attention q, k, v, o + MLP
    per_block += 2 * tokens * 2 * d * d + 2 * text_len * 2 * d * d  # cross-attention q, o on visual; k, v on text
    per_block += 4 * tokens * tokens * d + 4 * tokens * text_len * d  # self + cross attention scores and values
    return float(cfg.num_visual_blocks * per_block)


def sample_shapes(cfg: CrossDiTConfig, batch: PackedBatch) -> list[tuple[int, int]]:
    """(visual tokens, text tokens) of every sample of a packed trainer batch (text: real tokens only)."""
    pt, ph, pw = cfg.patch_size
    return [((x.shape[0] // pt) * (x.shape[1] // ph) * (x.shape[2] // pw), int(e.shape[-2]))
            for x, e in zip(batch.x0, batch.text_embeds)]


def batch_tokens_and_flops(cfg: CrossDiTConfig, batch: PackedBatch) -> tuple[int, float]:
    """Visual tokens and training model FLOPs (3 x forward) of one batch on one rank."""
    shapes = sample_shapes(cfg, batch)
    return sum(n for n, _ in shapes), sum(3 * forward_flops(cfg, n, t) for n, t in shapes)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset on CUDA; the process's max RSS on CPU (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / GIB


class _EndOfStep:
    def __init__(self, meter: ThroughputMeter):
        self.meter = meter

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.meter.restart_clock()


class ThroughputMeter:
    """Adds ``step_time_s``, ``tokens_per_s``, ``model_tflops`` (TFLOP/s) and ``peak_mem_gib`` to each
    step's metrics (global over ranks: tokens/FLOPs summed, time and memory the max of any rank).

    Reads the batch from ``trainer.last_batch``; register ``meter`` before and ``meter.end`` after all other
    callbacks."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.end = _EndOfStep(self)
        self.restart_clock()

    def restart_clock(self) -> None:
        if self.trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.trainer.device)
        self.t0 = time.perf_counter()

    def _reduce(self, values: Iterable[float], op: Any) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = t.to(self.trainer.device)  # NCCL reduces device tensors only
            dist.all_reduce(t, op=op)
        return [float(v) for v in t.cpu()]

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        seconds = time.perf_counter() - self.t0
        batch = getattr(self.trainer, "last_batch", None)
        cfg = getattr(self.trainer.model, "config", None)
        tokens, flops = batch_tokens_and_flops(cfg, batch) if batch is not None and cfg is not None else (0, 0.0)
        tokens, flops = self._reduce((tokens, flops), dist.ReduceOp.SUM)
        replicas = getattr(self.trainer, "batch_replicas", 1)  # a sequence-parallel group shares one batch
        tokens, flops = tokens / replicas, flops / replicas
        seconds, peak = self._reduce((seconds, peak_memory_gib(self.trainer.device)), dist.ReduceOp.MAX)
        metrics.update(step_time_s=seconds, tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
                       model_tflops=flops / seconds / 1e12 if seconds > 0 else 0.0, peak_mem_gib=peak)

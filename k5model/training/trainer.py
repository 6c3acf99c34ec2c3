"""The training loop: AdamW + linear warm-up, grad-norm clipping, fp32 EMA, CFG text dropout, optional bf16 autocast.

Deliberately free of Dagster/MLflow: tracking attaches through ``callbacks`` (objects with ``on_step(step, metrics)``).
Every random draw of a step (timesteps, noise, text dropout, I2V choice) comes from a generator seeded by
(seed, rank, step), so a resumed run repeats exactly what an uninterrupted run does without replaying RNG streams.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from k5model.flow_matching import TextCondition, flow_matching_loss_packed
from k5model.training.batch import PackedBatch, pack
from k5model.training.config import OptimConfig, StageConfig
from k5model.training.parallel import clean_name


class StepCallback(Protocol):
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed mixes all of ``key`` (SeedSequence avoids collisions of naive sums)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Data: a deterministic synthetic source (tests, benchmarks). Real sources (k5data.loading.training_source) yield the
# same PackedBatch and, for exact resume, have state_dict()/load_state_dict().


class SyntheticLatentSource(Iterator[PackedBatch]):
    """Endless packed batches of random latents + text embeddings drawn per (seed, rank, batch index).

    Each batch has one task drawn from the stage's mix (t2i batches hold images only, as on the shards) and one
    resolution; text lengths vary per sample. A batch depends only on its index, so ``state_dict`` is just the index
    and resume is exact."""

    def __init__(self, stage: StageConfig, *, rank: int = 0, in_channels: int = 16, text_dim: int = 32,
                 pooled_dim: int = 32, max_text_len: int = 6, visual_cond: bool = True):
        self.stage = stage
        self.rank = rank
        self.in_channels = in_channels
        self.text_dim = text_dim
        self.pooled_dim = pooled_dim
        self.max_text_len = max_text_len
        self.visual_cond = visual_cond
        self.index = 0
        self._res_keys = list(stage.resolutions)
        self._res_p = torch.tensor([stage.resolutions[k] for k in self._res_keys], dtype=torch.float64)
        self._tasks = list(stage.tasks)
        self._task_p = torch.tensor([stage.tasks[k] for k in self._tasks], dtype=torch.float64)

    def __iter__(self) -> SyntheticLatentSource:
        return self

    def __next__(self) -> PackedBatch:
        g = seeded_generator(self.stage.seed, self.rank, self.index, 0)
        self.index += 1
        h, w = StageConfig.parse_resolution(self._res_keys[int(torch.multinomial(self._res_p, 1, generator=g))])
        task = self._tasks[int(torch.multinomial(self._task_p, 1, generator=g))]
        b, frames = self.stage.batch, 1 if task in ("t2i", "edit") else self.stage.frames
        x0 = list(torch.randn(b, frames, h, w, self.in_channels, generator=g).unbind(0))
        lengths = torch.randint(1, self.max_text_len + 1, (b,), generator=g).tolist()
        embeds = [torch.randn(n, self.text_dim, generator=g) for n in lengths]
        pooled = torch.randn(b, self.pooled_dim, generator=g)
        sources = [torch.randn(x.shape, generator=g) for x in x0] if task == "edit" else None  # random source images
        return pack(x0, embeds, pooled, [task] * b, visual_cond=self.visual_cond, sources=sources,
                    ids=[f"synthetic-{self.rank}-{self.index - 1}-{i}" for i in range(b)])

    def null_condition(self) -> TextCondition:
        """Stand-in for the encoders' empty-prompt condition: fixed, shared by all ranks."""
        g = seeded_generator(self.stage.seed, 2**31)
        return TextCondition(torch.randn(1, 1, self.text_dim, generator=g), torch.ones(1, 1, dtype=torch.bool),
                             torch.randn(1, self.pooled_dim, generator=g))

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


# ---------------------------------------------------------------------------------------------------------------------
# Optimisation maths (module-level so they are unit-testable on their own).


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # foreach=False: the per-parameter path is what we verified to be bitwise reproducible across resume.
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (1-based): linear ramp base·step/warmup, then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, step / warmup_steps)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping.

    Under FSDP2 the per-shard norms are DTensors; ``full_tensor`` reduces them so every rank clips by the global
    norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=False)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return float(total)


class EMA:
    """fp32 shadow of every parameter: shadow ← decay·shadow + (1 - decay)·param after each optimiser step.

    Under FSDP2 the shadow holds the same shards as the parameters (DTensors), so it costs 4 bytes/param/world and
    is saved sharded by DCP; ``full_state_dict`` gathers it only for export."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            clean_name(n): p.detach().to(torch.float32, copy=True) for n, p in model.named_parameters()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        w = 1.0 - self.decay
        for n, p in model.named_parameters():
            s = _local(self.shadow[clean_name(n)])
            s.lerp_(_local(p.detach()).float(), w)  # s + w·(p - s) = decay·s + (1 - decay)·p

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copy (a collective under FSDP2: every rank must call it)."""
        return {n: (s.full_tensor() if isinstance(s, DTensor) else s).detach().cpu().clone()
                for n, s in self.shadow.items()}


# ---------------------------------------------------------------------------------------------------------------------


class Trainer:
    """Runs optimiser steps of one stage on an already-parallelised model (see ``parallel.apply_fsdp``)."""

    def __init__(
        self,
        model: nn.Module,
        stage: StageConfig,
        data: Iterator[PackedBatch],
        null_condition: TextCondition,
        *,
        callbacks: Iterable[StepCallback] = (),
        rank: int = 0,
        device: torch.device | str = "cpu",
        batch_replicas: int = 1,
    ):
        """``rank``: the data-parallel rank (seeds the step's draws). ``batch_replicas``: ranks that share each batch
        (a sequence-parallel group: each computes part of the same loss; ``parallel.apply_sequence_parallel``)."""
        self.model = model
        self.stage = stage
        self.optim_cfg = stage.optim
        self.data = data
        self.null_condition = null_condition
        self.callbacks = list(callbacks)
        self.rank = rank
        self.batch_replicas = int(batch_replicas)
        self.device = torch.device(device)
        self.optimizer = build_optimizer(model, self.optim_cfg)
        self.ema = EMA(model, stage.ema_decay)
        self.step = 0  # optimiser steps completed
        self._packed_forward_registered = False

    def _global_mean(self, value: torch.Tensor) -> float:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # NCCL reduces device tensors only; metrics such as the dropout fraction live on the CPU
            value = value.detach().to(self.device, torch.float32).clone()
            dist.all_reduce(value)
            value /= dist.get_world_size()
        return float(value.detach())

    def _global_sum(self, value: int) -> int:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = torch.tensor(float(value), device=self.device, dtype=torch.float64)
            dist.all_reduce(total)
            return int(total.item()) // self.batch_replicas  # a shared batch counts once
        return int(value)

    def _loss(self, batch: PackedBatch, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Flow-matching loss of a packed batch through ``CrossDiT.forward_packed``; returns (loss, dropped text (N,)
        bool, real visual tokens)."""
        if not self._packed_forward_registered:
            from torch.distributed.fsdp import register_fsdp_forward_method

            # FSDP2 gathers the root's parameters only around forward(); register the packed entry point too
            register_fsdp_forward_method(self.model, "forward_packed")
            self._packed_forward_registered = True
        dev = self.device
        n = len(batch)
        # CFG training: the text of a fraction of samples becomes the empty prompt's (its real tokens only).
        dropped = torch.rand(n, generator=g) < self.stage.uncond_prob
        null = self.null_condition
        null_tokens = null.embeds[0] if null.mask is None else null.embeds[0][null.mask[0].bool()]
        texts = [null_tokens.to(dev) if d else e.to(dev) for d, e in zip(dropped.tolist(), batch.text_embeds)]
        pooled = torch.where(dropped[:, None].to(dev), null.pooled.to(dev, batch.pooled.dtype).expand(n, -1),
                             batch.pooled.to(dev))
        condition = None if batch.condition is None else [c.to(dev) for c in batch.condition]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.stage.bf16):
            loss, aux = flow_matching_loss_packed(
                self.model, [x.to(dev) for x in batch.x0], texts, pooled, condition=condition,
                clean_frames=batch.clean_frames, generator=g, shift=self.stage.timestep_shift,
                scheme=self.stage.timestep_scheme,
            )
        return loss, dropped, int(aux["tokens"])

    def train_step(self) -> dict[str, float]:
        self.model.train()
        batch = next(self.data)
        if not isinstance(batch, PackedBatch):
            raise TypeError(f"data sources yield PackedBatch, got {type(batch).__name__}")
        self.last_batch = batch  # read by callbacks (throughput.ThroughputMeter: tokens and FLOPs)
        step = self.step + 1
        g = seeded_generator(self.stage.seed, self.rank, step, 1)
        loss, dropped, tokens = self._loss(batch, g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {step}")
        # FSDP averages gradients over every rank; the ranks of a sequence-parallel group each hold part of the same
        # loss's gradient, which must be summed, not averaged (N is a power of two in practice: the scaling is exact)
        (loss * self.batch_replicas if self.batch_replicas > 1 else loss).backward()
        grad_norm = clip_gradients(self.model.parameters(), self.optim_cfg.grad_clip)
        lr = warmup_lr(step, self.optim_cfg.lr, self.optim_cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step = step
        metrics = {"loss": self._global_mean(loss), "grad_norm": grad_norm, "lr": lr,
                   "uncond_frac": self._global_mean(dropped.float().mean()),
                   "tokens": self._global_sum(tokens),  # real visual tokens of the step, all ranks
                   "samples": self._global_sum(len(batch))}
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite grad norm at step {step}")
        for cb in self.callbacks:
            cb.on_step(step, metrics)
        return metrics

    def train(self, until_step: int) -> list[dict[str, float]]:
        """Run steps until ``self.step == until_step`` (a resumed trainer continues where it stopped)."""
        history = []
        while self.step < until_step:
            history.append(self.train_step())
        return history

"""Parallelism applied to a CrossDiT from the outside, torchtitan style: FSDP2 / HSDP, activation checkpointing and
Ulysses sequence parallel (the model file knows only the seam ``CrossDiT.sequence_parallel``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

# checkpoint_wrapper inserts this into parameter names; state_dict() strips it, named_parameters() does not.
AC_PREFIX = "_checkpoint_wrapped_module."


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [model.text_transformer_blocks, model.visual_transformer_blocks]


@functools.lru_cache(maxsize=1)
def _attention_ops() -> frozenset:
    aten = torch.ops.aten
    ops = {aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default}
    if hasattr(torch.ops.higher_order, "flex_attention"):
        ops.add(torch.ops.higher_order.flex_attention)
    return frozenset(ops)


def _save_attention_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    # Attention is ~80% of a block's FLOPs at video lengths but its outputs are small (one (S, d) tensor + the
    # log-sum-exp): keeping them and recomputing only the matmuls and element-wise work removes most of the
    # recompute cost of activation checkpointing for a few GB.
    return CheckpointPolicy.MUST_SAVE if op in _attention_ops() else CheckpointPolicy.PREFER_RECOMPUTE


class OffloadStats:
    """What ``HostOffload`` moved since the last ``reset()`` (tensors and bytes packed to host)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tensors = 0
        self.bytes = 0


offload_stats = OffloadStats()


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep every tensor autograd saves inside the context in host memory until backward.

    Entered around a non-reentrant checkpointed call, it sees exactly that call's inputs (checkpoint saves them
    through the active hooks before installing its own), so a block's input lives in pinned host memory between
    forward and backward and is copied back when the block is recomputed. The copies are ``non_blocking`` on the
    current stream, so they overlap compute and are ordered before any reuse of the freed device memory. Tensors that
    need no gradient (RoPE tables, masks: shared by all blocks and alive anyway) stay where they are. On CPU tensors
    are already in host memory and are kept as they are (the hooks still run, which is what the CPU tests check)."""

    def __init__(self, stats: OffloadStats | None = None) -> None:
        stats = offload_stats if stats is None else stats

        def pack(t: torch.Tensor) -> tuple[torch.device | None, torch.Tensor]:
            if not t.requires_grad:
                return None, t
            stats.tensors += 1
            stats.bytes += t.numel() * t.element_size()
            if t.device.type == "cpu":
                return t.device, t
            host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return t.device, host

        def unpack(packed: tuple[torch.device | None, torch.Tensor]) -> torch.Tensor:
            device, t = packed
            return t if device is None or t.device == device else t.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def _offloaded_checkpoint(fn, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint`` (non-reentrant) with the call's saved inputs held in host memory."""
    from torch.utils.checkpoint import checkpoint

    with HostOffload():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, *, save_attention: float = 0.0,
                                   offload: bool = False) -> nn.Module:
    """Wrap every transformer block so its activations are recomputed in backward (call before FSDP).

    ``save_attention`` in [0, 1]: the fraction of blocks (first ones first) made selective — their attention outputs
    are saved and only the rest is recomputed. 1.0 is fastest; lower it when the saved outputs do not fit.

    ``offload``: keep each block's saved inputs (the only activations a checkpointed block holds between forward and
    backward) in pinned host memory instead of GPU memory (report §6.1.3), see ``HostOffload``."""
    if not 0.0 <= float(save_attention) <= 1.0:
        raise ValueError(f"save_attention must be a fraction in [0, 1], got {save_attention}")
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    selective = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_attention_policy)}
    for blocks in _block_lists(model):
        n_saved = round(float(save_attention) * len(blocks))
        for i, block in enumerate(blocks):
            kwargs = dict(selective) if i < n_saved else {}
            if offload:
                kwargs["checkpoint_fn"] = _offloaded_checkpoint  # gets context_fn and preserve_rng_state through
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True, **kwargs)
    return model


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2: one ``fully_shard`` unit per block (all-gather overlaps the previous block) and one for the root
    (embeddings + out layer). Reduction stays fp32 so gradients do not lose precision under bf16 compute.

    ``mesh``: None = shard over the whole default group (FSDP); a 1-D mesh = shard over it; a 2-D mesh
    ``(replicate, shard)`` (see ``training_mesh``) = HSDP: parameters are sharded within each shard group, the groups
    hold replicas, and gradients are reduce-scattered within a group then all-reduced across groups."""
    if mesh is not None and mesh.ndim not in (1, 2):
        raise ValueError(f"apply_fsdp needs a 1-D (shard) or 2-D (replicate, shard) mesh, got {mesh.ndim} dims")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for blocks in _block_lists(model):
        for block in blocks:
            fully_shard(block, **kwargs)
    # The root keeps its parameters gathered after forward: backward needs them immediately.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def training_mesh(world_size: int, replicate: int = 1, device_type: str = "cpu",
                  sequence_parallel: int = 1) -> DeviceMesh | None:
    """The device mesh of a run: None for plain FSDP over all ranks (``replicate == 1``, no sequence parallel), else
    a 2-D HSDP mesh ``(replicate, shard)`` with ``shard = world_size / replicate`` (e.g. one shard group per node,
    replicas across). With ``sequence_parallel`` N > 1 the last dim is ``sp`` (N consecutive ranks share each batch):
    ``(dp, sp)``, or ``(replicate, shard, sp)`` with HSDP; parameters are sharded over all non-replicate dims
    (``fsdp_mesh``)."""
    if replicate < 1 or world_size % replicate:
        raise ValueError(f"--replicate {replicate} must be >= 1 and divide the world size {world_size} "
                         f"(world = replicate x shard group size)")
    if sequence_parallel < 1 or (world_size // replicate) % sequence_parallel:
        raise ValueError(f"--sequence-parallel {sequence_parallel} must be >= 1 and divide the ranks of a replica "
                         f"({world_size} / replicate {replicate} = {world_size // replicate})")
    if replicate == 1 and sequence_parallel == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if sequence_parallel == 1:
        return init_device_mesh(device_type, (replicate, world_size // replicate),
                                mesh_dim_names=("replicate", "shard"))
    dp = world_size // sequence_parallel
    if replicate == 1:
        return init_device_mesh(device_type, (dp, sequence_parallel), mesh_dim_names=("dp", "sp"))
    return init_device_mesh(device_type, (replicate, dp // replicate, sequence_parallel),
                            mesh_dim_names=("replicate", "shard", "sp"))


def fsdp_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The mesh ``apply_fsdp`` shards over: ``mesh`` itself without sequence parallel; with it the sp dim is folded
    into the shard dim (sp ranks hold different tokens of the same samples, like data-parallel ranks)."""
    if mesh is None or "sp" not in mesh.mesh_dim_names:
        return mesh
    if mesh.mesh_dim_names == ("dp", "sp"):
        return mesh["dp", "sp"]._flatten("dp_sp")
    mesh["shard", "sp"]._flatten("shard_sp")
    return mesh["replicate", "shard_sp"]


def sp_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The 1-D sequence-parallel mesh of a run (None without sequence parallel)."""
    return mesh["sp"] if mesh is not None and "sp" in mesh.mesh_dim_names else None


def data_parallel_rank(mesh: DeviceMesh | None, rank: int, world_size: int) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas: the ranks of a sequence-parallel group share
    one batch, so they read the same data and draw the same noise."""
    if mesh is None or "sp" not in mesh.mesh_dim_names:
        return rank, world_size
    sp = mesh["sp"].size()
    return rank // sp, world_size // sp  # sp is the last (fastest) mesh dim: an sp group is consecutive ranks


def clean_name(name: str) -> str:
    """Parameter name as the plain CrossDiT (and its checkpoints) spell it."""
    return name.replace(AC_PREFIX, "")


# ---------------------------------------------------------------------------------------------------------------------
# Sequence parallel (Ulysses, DeepSpeed-Ulysses / torchtitan style)
#
# The visual tokens of a packed sequence are split into contiguous runs, one per rank of a sequence-parallel group;
# everything per-token (projections, norms, RoPE, modulation, MLP, out layer) runs on the local run. Around each
# attention one all-to-all turns (local tokens, all heads) into (all tokens, heads/N), so each rank attends the WHOLE
# sequence (masks and NABLA's block selection see every token) for its own heads, and a second one turns the output
# back. Gradient accounting: every rank's loss is the full loss (the output is gathered with a backward that keeps the
# local rows), and each parameter use is computed by exactly one rank, so the sum of the group's gradients is the
# one-rank gradient; ``Trainer(batch_replicas=N)`` scales the loss by N because FSDP averages over dp x sp ranks.


def _exchange(x: torch.Tensor, group: Any, send: list[int], recv: list[int]) -> torch.Tensor:
    out = x.new_empty(sum(recv))
    # gloo implements all_to_all_single with uneven split sizes on CPU (alltoallv), NCCL on GPU: no emulation needed
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a flat tensor with split sizes in elements; its backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, send: list[int], recv: list[int]) -> torch.Tensor:
        ctx.group, ctx.send, ctx.recv = group, send, recv
        return _exchange(x, group, send, recv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group, ctx.recv, ctx.send), None, None, None


class _GatherSequence(torch.autograd.Function):
    """Every rank's run of dim 1 concatenated in rank order. Backward: this rank's rows of the gradient, unreduced —
    the contract is that every rank computes the same thing from the gathered tensor (the loss), so each rank's
    gradient of it already is the full one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shards: SequenceShards) -> torch.Tensor:
        ctx.shards = shards
        rest = math.prod(x.shape[2:])
        b, w = x.shape[0], len(shards.sizes)
        flat = x.contiguous().flatten()
        recv = _exchange(flat.repeat(w), shards.group, [flat.numel()] * w, [b * s * rest for s in shards.sizes])
        parts = [p.view(b, s, *x.shape[2:]) for p, s in zip(recv.split([b * s * rest for s in shards.sizes]),
                                                            shards.sizes)]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.shards.shard(grad).contiguous(), None


@dataclass(frozen=True)
class SequenceShards:
    """One forward's split of a token sequence over a sequence-parallel group: contiguous runs of ``sizes`` tokens
    (near-equal, the first ones one longer when the length does not divide), run ``rank`` held here."""

    group: Any
    rank: int
    sizes: tuple[int, ...]

    @property
    def start(self) -> int:
        return sum(self.sizes[:self.rank])

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's run of ``x`` along ``dim`` (a full-sequence tensor every rank holds)."""
        return x.narrow(dim, self.start, self.sizes[self.rank])

    def local_lengths(self, lengths: Sequence[int]) -> list[int]:
        """Tokens of each packed document inside this rank's run (0 for documents elsewhere)."""
        lo, hi, out, at = self.start, self.start + self.sizes[self.rank], [], 0
        for n in lengths:
            out.append(max(0, min(hi, at + n) - max(lo, at)))
            at += n
        return out

    def _heads_per_rank(self, heads: int) -> int:
        w = len(self.sizes)
        if heads % w:
            raise ValueError(f"sequence parallel over {w} ranks needs a head count divisible by {w}, got {heads}")
        return heads // w

    def to_full_sequence(self, *ts: torch.Tensor) -> list[torch.Tensor]:
        """(B, local tokens, H, D) tensors -> (B, all tokens, H/N, D) for this rank's heads; one all-to-all for all."""
        b, s, heads, d = ts[0].shape
        w, h = len(self.sizes), self._heads_per_rank(heads)
        n = len(ts)
        # (n, B, s, w, h, D) -> (w, n, B, s, h, D): the chunk for rank j holds its heads of every tensor
        send = torch.stack(ts).view(n, b, s, w, h, d).permute(3, 0, 1, 2, 4, 5).flatten()
        recv = _AllToAll.apply(send, self.group, [n * b * s * h * d] * w, [n * b * si * h * d for si in self.sizes])
        parts = [p.view(n, b, si, h, d) for p, si in zip(recv.split([n * b * si * h * d for si in self.sizes]),
                                                         self.sizes)]
        return list(torch.cat(parts, dim=2).unbind(0))

    def to_local_sequence(self, t: torch.Tensor) -> torch.Tensor:
        """(B, all tokens, H/N, D) of this rank's heads -> (B, local tokens, H, D); inverse of ``to_full_sequence``."""
        b, _, h, d = t.shape
        w, s = len(self.sizes), self.sizes[self.rank]
        send = torch.cat([p.flatten() for p in t.split(list(self.sizes), dim=1)])
        recv = _AllToAll.apply(send, self.group, [b * si * h * d for si in self.sizes], [b * s * h * d] * w)
        return recv.view(w, b, s, h, d).permute(1, 2, 0, 3, 4).reshape(b, s, w * h, d)

    def local_heads(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a (B, L, H, D) tensor every rank computed whole (cross-attention keys/values)."""
        h = self._heads_per_rank(t.shape[2])
        return t.narrow(2, self.rank * h, h)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, local tokens, ...) -> (B, all tokens, ...) on every rank (see ``_GatherSequence`` for the backward)."""
        return _GatherSequence.apply(x, self)


class SequenceParallel:
    """The sequence-parallel group a CrossDiT splits its visual tokens over (``CrossDiT.sequence_parallel``)."""

    def __init__(self, group: Any):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def shards(self, total: int) -> SequenceShards:
        base, extra = divmod(total, self.world)
        return SequenceShards(self.group, self.rank, tuple(base + (i < extra) for i in range(self.world)))


def apply_sequence_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Ulysses sequence parallel over the 1-D ``mesh`` (``sp_mesh(training_mesh(...))``): ``forward_packed`` then
    splits the visual tokens over its ranks. Every rank of the group must be given the same batch. Composes with
    ``apply_activation_checkpointing`` (the exchanges are recomputed with the block) and ``apply_fsdp``."""
    if mesh.ndim != 1:
        raise ValueError(f"apply_sequence_parallel needs the 1-D sp mesh, got {mesh.ndim} dims")
    heads = model.config.num_heads
    if heads % mesh.size():
        raise ValueError(f"--sequence-parallel {mesh.size()} must divide the model's {heads} attention heads")
    model.sequence_parallel = SequenceParallel(mesh.get_group())
    return model

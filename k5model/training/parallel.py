"""Parallelism applied to a CrossDiT from the outside (the model file knows nothing about it), torchtitan style."""

from __future__ import annotations

import functools

import torch
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


def training_mesh(world_size: int, replicate: int = 1, device_type: str = "cpu") -> DeviceMesh | None:
    """The device mesh of a run: None for plain FSDP over all ranks (``replicate == 1``), else a 2-D HSDP mesh
    ``(replicate, shard)`` with ``shard = world_size / replicate`` (e.g. one shard group per node, replicas across)."""
    if replicate < 1 or world_size % replicate:
        raise ValueError(f"--replicate {replicate} must be >= 1 and divide the world size {world_size} "
                         f"(world = replicate x shard group size)")
    if replicate == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


def clean_name(name: str) -> str:
    """Parameter name as the plain CrossDiT (and its checkpoints) spell it."""
    return name.replace(AC_PREFIX, "")

"""Parallelism applied to a CrossDiT from the outside (the model file knows nothing about it), torchtitan style."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

# checkpoint_wrapper inserts this into parameter names; state_dict() strips it, named_parameters() does not.
AC_PREFIX = "_checkpoint_wrapped_module."


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [model.text_transformer_blocks, model.visual_transformer_blocks]


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every transformer block so its activations are recomputed in backward (call before FSDP)."""
    for blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)
    return model


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2: one ``fully_shard`` unit per block (all-gather overlaps the previous block) and one for the root
    (embeddings + out layer). Reduction stays fp32 so gradients do not lose precision under bf16 compute."""
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


def clean_name(name: str) -> str:
    """Parameter name as the plain CrossDiT (and its checkpoints) spell it."""
    return name.replace(AC_PREFIX, "")

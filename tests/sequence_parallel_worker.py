"""torchrun worker of tests/test_sequence_parallel.py: one training step's loss and gradients of a tiny CrossDiT with
Ulysses sequence parallel (+ FSDP2 / HSDP, activation checkpointing) against the same step on one process.

Every rank computes the one-process reference itself (plain model, no process group in the loop): for each data-
parallel replica's batch its loss and gradients, averaged over the replicas as FSDP does. Then the parallel model
runs the same step; rank 0 writes, per configuration, the largest loss difference and the largest gradient deviation
relative to the largest reference gradient of that parameter.

``python -m torch.distributed.run --nproc-per-node N tests/sequence_parallel_worker.py OUT CONFIG [CONFIG ...]``,
CONFIG = ``sp=2,replicate=1,dim=32,attention=regular,ac=0``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from k5model.config import get_preset
from k5model.crossdit import CrossDiT
from k5model.flow_matching import flow_matching_loss_packed
from k5model.runtime_options import NablaOptions
from k5model.training.parallel import (
    apply_activation_checkpointing,
    apply_fsdp,
    apply_sequence_parallel,
    clean_name,
    data_parallel_rank,
    fsdp_mesh,
    sp_mesh,
    training_mesh,
)
from k5model.training.trainer import seeded_generator


def batch(replica: int, attention: str, dim: int) -> dict:
    """A packed batch of two documents; dense: token counts that no group size divides (uneven runs), NABLA: grids
    of whole 8x8-token tiles."""
    g = seeded_generator(11, replica)
    shapes = [(1, 32, 32), (2, 32, 16)] if attention == "nabla" else [(1, 6, 10), (3, 4, 6)]
    x0 = [torch.randn(*s, 16, generator=g) for s in shapes]
    texts = [torch.randn(n, 32, generator=g) for n in (3, 5)]
    return {"x0": x0, "text_embeds": texts, "pooled": torch.randn(2, 32, generator=g)}


def model(attention: str, dim: int) -> CrossDiT:
    torch.manual_seed(0)
    # NABLA without STA and a low mass threshold: a genuinely sparse, per-head block selection
    m = CrossDiT(get_preset("tiny", attention_type=attention, model_dim=dim, ff_dim=2 * dim, attention_P=0.5,
                            attention_add_sta=False))
    m.set_options(nabla=NablaOptions(track_density=True))
    with torch.no_grad():  # the modulations start at zero (identity blocks): make every path carry gradient
        for name, p in m.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.05, generator=seeded_generator(5, len(name)))
    return m


def loss_of(m: torch.nn.Module, b: dict, replica: int) -> torch.Tensor:
    loss, _ = flow_matching_loss_packed(m, b["x0"], b["text_embeds"], b["pooled"],
                                        generator=seeded_generator(3, replica))
    return loss


def run(cfg: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    sp, replicate, dim = int(cfg["sp"]), int(cfg.get("replicate", 1)), int(cfg.get("dim", 32))
    attention = cfg.get("attention", "regular")
    replicas = world // sp
    reference = model(attention, dim)
    ref_losses, ref_grads = [], {}
    for d in range(replicas):
        reference.zero_grad()
        loss = loss_of(reference, batch(d, attention, dim), d)
        loss.backward()
        ref_losses.append(float(loss.detach()))
        for n, p in reference.named_parameters():
            ref_grads[n] = ref_grads.get(n, 0) + p.grad / replicas

    m = model(attention, dim)
    mesh = training_mesh(world, replicate, "cpu", sequence_parallel=sp)
    if cfg.get("ac") == "1":
        apply_activation_checkpointing(m)
    apply_fsdp(m, mesh=fsdp_mesh(mesh))
    apply_sequence_parallel(m, sp_mesh(mesh))
    register_fsdp_forward_method(m, "forward_packed")
    d, _ = data_parallel_rank(mesh, rank, world)
    loss = loss_of(m, batch(d, attention, dim), d)
    # what Trainer(batch_replicas=sp) does; scale=0 is the control showing the check catches averaged gradients
    (loss * sp if cfg.get("scale", "1") == "1" else loss).backward()
    loss_diff = torch.tensor([abs(float(loss) - ref_losses[d])], dtype=torch.float64)
    dist.all_reduce(loss_diff, op=dist.ReduceOp.MAX)
    worst, worst_name = 0.0, ""
    for n, p in m.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        ref = ref_grads[clean_name(n)]
        rel = float((grad - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if rel > worst:
            worst, worst_name = rel, clean_name(n)
    zero = [n for n, g in ref_grads.items() if float(g.abs().max()) == 0.0]
    return {**cfg, "loss_diff": float(loss_diff), "loss": ref_losses, "grad_rel": worst, "worst": worst_name,
            "params": len(ref_grads), "zero_grads": zero, "nabla_density": reference.last_nabla_density,
            "mesh": dict(zip(mesh.mesh_dim_names, mesh.shape))}


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = [run(dict(kv.split("=") for kv in spec.split(","))) for spec in sys.argv[2:]]
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Parallelism options of the training engine (issue 5): host offload of checkpointed block inputs (exact gradients on
CPU) and HSDP on a 2 x 2 mesh of 4 gloo processes (losses equal plain FSDP's, save/resume exact)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_dcp

from k5model.crossdit import CrossDiT
from k5model.flow_matching import flow_matching_loss_packed
from k5model.training.config import get_stage
from k5model.training.parallel import (
    HostOffload,
    OffloadStats,
    apply_activation_checkpointing,
    offload_stats,
    training_mesh,
)
from k5model.training.trainer import SyntheticLatentSource, seeded_generator

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# host offload of block inputs


def _grads(**ac) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one tiny_demo batch through a CrossDiT with the given activation checkpointing."""
    stage = get_stage("tiny_demo")
    torch.manual_seed(0)
    model = CrossDiT(stage.model_preset)
    if ac:
        apply_activation_checkpointing(model, **ac)
    data = SyntheticLatentSource(stage, text_dim=32, pooled_dim=32)
    batch = next(data)
    while batch.tasks[0] != "i2v":  # an I2V batch: the condition channels go through the blocks too
        batch = next(data)
    loss, _ = flow_matching_loss_packed(model, batch.x0, batch.text_embeds, batch.pooled, condition=batch.condition,
                                        clean_frames=batch.clean_frames, generator=seeded_generator(0, 1))
    loss.backward()
    return float(loss.detach()), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                         for n, p in model.named_parameters()}


def test_offloaded_block_inputs_give_exact_gradients(one_thread) -> None:
    loss, plain = _grads()
    offload_stats.reset()
    loss_off, offloaded = _grads(offload=True)
    assert loss_off == loss
    assert offloaded.keys() == plain.keys()
    assert all(torch.equal(offloaded[n], plain[n]) for n in plain), "offloading changed a gradient"
    # exactly the blocks' inputs went through the hooks: text blocks (x, time) and visual blocks (x, text, time);
    # RoPE tables and masks need no gradient and stay put
    cfg = CrossDiT("tiny").config
    assert offload_stats.tensors == 2 * cfg.num_text_blocks + 3 * cfg.num_visual_blocks
    assert offload_stats.bytes > 0
    # composes with the selective (save-attention) checkpointing of the same function
    offload_stats.reset()
    _, selective = _grads(offload=True, save_attention=1.0)
    assert all(torch.equal(selective[n], plain[n]) for n in plain)
    assert offload_stats.tensors == 2 * cfg.num_text_blocks + 3 * cfg.num_visual_blocks


def test_host_offload_hooks_move_saved_tensors_and_back() -> None:
    stats = OffloadStats()
    x = torch.randn(3, 4, requires_grad=True)
    with HostOffload(stats):
        y = (x * x).sum()  # mul saves x (needs grad)
    y.backward()
    assert torch.equal(x.grad, 2 * x.detach()) and stats.tensors == 2 and stats.bytes == 2 * 12 * 4


def test_training_mesh_rejects_bad_replicate() -> None:
    assert training_mesh(4, 1) is None  # plain FSDP needs no mesh
    for bad in (0, 3, 8):
        with pytest.raises(ValueError, match=f"--replicate {bad}"):
            training_mesh(4, bad)


# --------------------------------------------------------------------------------------------------------------------
# HSDP: 4 gloo processes, (replicate 2, shard 2) against FSDP over 4


def _torchrun(out: Path, *extra: str) -> list[dict]:
    # --standalone: torchrun binds its rendezvous to a free port itself (no pick-then-bind race with other tests)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "k5cli.train_run", "--stage", "tiny_demo", "--out", str(out),
           "--steps", "6", "--ckpt-every", "3", "--keep", "2", "--no-export", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _steps(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if "loss" in r}


def test_hsdp_matches_fsdp_and_resumes_exactly(tmp_path: Path) -> None:
    fsdp = _torchrun(tmp_path / "fsdp")
    hsdp = _torchrun(tmp_path / "hsdp", "--replicate", "2", "--offload-activations")
    assert fsdp[0]["mesh"] is None and fsdp[0]["world_size"] == 4
    assert hsdp[0]["mesh"] == {"replicate": 2, "shard": 2}
    a, b = _steps(fsdp), _steps(hsdp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # Same seed and global batch (4 ranks x 2 samples): the same maths, only the gradient reduction differs
    # (reduce-scatter over 4 vs reduce-scatter over 2 then all-reduce over 2), so float rounding is the only gap.
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-5), step
    wa, wb = load_dcp(tmp_path / "fsdp/checkpoints/step_6"), load_dcp(tmp_path / "hsdp/checkpoints/step_6")
    for part in ("model", "ema"):
        assert wa[part].keys() == wb[part].keys()
        for k in wa[part]:
            torch.testing.assert_close(wb[part][k], wa[part][k], rtol=1e-4, atol=1e-6)

    # Save/load: a fresh HSDP job resumed from the step-3 checkpoint repeats steps 4-6 bit for bit.
    resumed_out = tmp_path / "resumed"
    (resumed_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "hsdp/checkpoints/step_3", resumed_out / "checkpoints/step_3")
    resumed = _torchrun(resumed_out, "--replicate", "2", "--offload-activations", "--resume")
    assert resumed[0]["resumed_from"] == 3 and resumed[0]["mesh"] == {"replicate": 2, "shard": 2}
    c = _steps(resumed)
    assert sorted(c) == [4, 5, 6]
    for step in c:
        assert (c[step]["loss"], c[step]["grad_norm"]) == (b[step]["loss"], b[step]["grad_norm"]), step
    wc = load_dcp(resumed_out / "checkpoints/step_6")
    for part in ("model", "ema"):
        assert all(torch.equal(wc[part][k], wb[part][k]) for k in wb[part]), part
    for key, state in wb["optim"]["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(wc["optim"]["state"][key][n]))
                   for n, v in state.items())
    # throughput metrics are global: every step reports them
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 and r["peak_mem_gib"] > 0 for r in b.values())

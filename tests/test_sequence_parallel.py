"""Ulysses sequence parallel (issue 19): the token split and head exchange bookkeeping by hand, and exactness on CPU
with gloo: real torchrun processes (2 and 4 ranks; dense and NABLA; composed with FSDP2, HSDP and activation
checkpointing) give the one-process loss and gradients of a training step. The resume test of an SP run is in
tests/test_training_resume.py.

Tolerances: the loss is computed from the gathered output on every rank and comes out bit-identical (checked <= 1e-6
absolute); gradients are sums of per-rank partial sums, so only float rounding differs: every parameter's largest
deviation is <= 1e-5 of its largest reference gradient (measured: ~1e-6). A control run that averages instead of
summing the group's gradients (no loss scaling) is off by 0.5 and fails that same check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k5model.training.parallel import SequenceShards, data_parallel_rank, training_mesh

REPO = Path(__file__).resolve().parents[1]
LOSS_TOL, GRAD_REL_TOL = 1e-6, 1e-5


def test_sequence_split_and_local_document_lengths() -> None:
    sizes = [SequenceShards(None, r, (14, 13)) for r in range(2)]
    assert [s.start for s in sizes] == [0, 14]
    # documents of 15 and 12 tokens over runs [0, 14) and [14, 27)
    assert sizes[0].local_lengths([15, 12]) == [14, 0]
    assert sizes[1].local_lengths([15, 12]) == [1, 12]
    four = [SequenceShards(None, r, (7, 7, 7, 6)) for r in range(4)]
    assert [s.local_lengths([15, 12]) for s in four] == [[7, 0], [7, 0], [1, 6], [0, 6]]
    x = torch.arange(27)[None]
    assert torch.equal(torch.cat([s.shard(x) for s in four], dim=1), x)


def test_heads_must_divide_over_the_group() -> None:
    kv = torch.zeros(1, 5, 4, 8)  # (B, L, heads, D)
    assert SequenceShards(None, 1, (3, 3)).local_heads(kv).shape == (1, 5, 2, 8)
    with pytest.raises(ValueError, match="head count divisible by 3"):
        SequenceShards(None, 0, (3, 3, 3)).local_heads(kv)


def test_mesh_rejects_a_group_that_does_not_divide() -> None:
    assert training_mesh(4, 1, sequence_parallel=1) is None
    for replicate, sp in ((1, 3), (2, 4), (1, 0)):
        with pytest.raises(ValueError, match=f"--sequence-parallel {sp}"):
            training_mesh(4, replicate, sequence_parallel=sp)
    assert data_parallel_rank(None, 3, 4) == (3, 4)


def _worker(tmp_path: Path, nproc: int, *configs: str) -> list[dict]:
    out = tmp_path / f"sp{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO / "tests" / "sequence_parallel_worker.py"), str(out), *configs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_exact(result: dict) -> None:
    assert result["loss_diff"] <= LOSS_TOL, result
    assert result["grad_rel"] <= GRAD_REL_TOL, result
    assert result["params"] == 80 and not result["zero_grads"], result  # every parameter carries gradient


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_loss_and_gradients(tmp_path: Path) -> None:
    dense, nabla, control = _worker(tmp_path, 2, "sp=2", "sp=2,attention=nabla", "sp=2,scale=0")
    assert dense["mesh"] == {"dp": 1, "sp": 2}
    _assert_exact(dense)
    _assert_exact(nabla)
    assert 0.0 < nabla["nabla_density"] < 1.0  # a sparse, per-head block selection, built on each rank for its heads
    # averaging (not summing) the group's partial gradients: the same check fails
    assert control["loss_diff"] <= LOSS_TOL and control["grad_rel"] == pytest.approx(0.5, rel=1e-3)


@pytest.mark.slow
def test_four_ranks_give_the_one_rank_loss_and_gradients(tmp_path: Path) -> None:
    results = _worker(tmp_path, 4, "sp=4,dim=64", "sp=4,dim=64,attention=nabla",  # 4 heads of 16
                      "sp=2,replicate=2,ac=1",  # HSDP replicas of an sp pair, activation checkpointing
                      "sp=2,ac=1,attention=nabla")  # 2 data-parallel replicas x sp 2
    meshes = [r["mesh"] for r in results]
    assert meshes == [{"dp": 1, "sp": 4}, {"dp": 1, "sp": 4}, {"replicate": 2, "shard": 1, "sp": 2},
                      {"dp": 2, "sp": 2}]
    for r in results:
        _assert_exact(r)
    assert len(results[2]["loss"]) == 2  # two replicas, two batches: the reference averages their gradients

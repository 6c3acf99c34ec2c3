"""Non-blocking checkpoints (issue 19): ``AsyncCheckpointer`` stages the sharded state to host memory and writes it in a
background thread. While a save is in flight nothing resumable exists (only ``step_N.tmp``); once it completes the
folder verifies (checksums written after the write), holds exactly the state of the step it was taken at although
training went on meanwhile, and resumes bit for bit like a synchronous save. A failing write surfaces as
CheckpointWriteError at the next wait and leaves nothing behind. The torchrun SIGKILL + resume test runs its victim
with --async-checkpoint (tests/test_training_resume.py)."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import torch
from helpers import tiny_demo_trainer
from torch.distributed.checkpoint import FileSystemWriter

from k5model.training.checkpointing import (
    AsyncCheckpointer,
    CheckpointWriteError,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from k5model.training.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class GatedWriter(FileSystemWriter):
    """DCP's file-system writer that holds its data write until ``gate`` is set (to observe a save in flight), or
    fails it with ``error``."""

    def __init__(self, path: Path, gate: threading.Event, error: OSError | None = None):
        super().__init__(path)
        self.gate, self.error = gate, error

    def write_data(self, plan, planner):
        assert self.gate.wait(timeout=60), "test gate never opened"
        if self.error is not None:
            raise self.error
        return super().write_data(plan, planner)


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()})
    for i, s in enumerate(trainer.optimizer.state.values()):
        state.update({f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
    return state


def test_in_flight_save_is_not_resumable_and_completes_with_the_staged_step(one_thread, tmp_path: Path) -> None:
    trainer = tiny_demo_trainer()
    ckpt = tmp_path / "ckpt"
    trainer.train(2)
    save_checkpoint(trainer, ckpt)  # a complete step_2 to fall back to
    trainer.train(3)
    at_step_3 = _snapshot(trainer)
    gate = threading.Event()
    saver = AsyncCheckpointer(trainer, ckpt, keep=3, storage_writer=lambda path: GatedWriter(path, gate))
    stall = saver.save()
    assert stall >= 0 and saver.in_flight()
    # in flight: at most the .tmp folder exists (DCP creates it from the thread), and resume still picks step_2
    assert {p.name for p in ckpt.iterdir()} <= {"step_2", "step_3.tmp"} and not (ckpt / "step_3").exists()
    assert resumable_checkpoint(ckpt).path == ckpt / "step_2"
    later = [trainer.train_step()["loss"] for _ in range(2)]  # training goes on, changing weights in place
    assert not torch.equal(trainer.model.state_dict()["out_layer.out_layer.weight"],
                           at_step_3["model.out_layer.out_layer.weight"])
    gate.set()
    assert saver.close() == ckpt / "step_3" and not saver.in_flight()
    assert verify_checkpoint(ckpt / "step_3") is None
    assert resumable_checkpoint(ckpt).path == ckpt / "step_3"

    # the checkpoint holds step 3 exactly (the staged copy, not the weights of step 5) and resumes exactly
    fresh = tiny_demo_trainer()
    assert load_checkpoint(fresh, ckpt / "step_3") == 3
    restored = _snapshot(fresh)
    assert restored.keys() == at_step_3.keys()
    assert all(torch.equal(restored[k], at_step_3[k]) for k in at_step_3)
    assert [fresh.train_step()["loss"] for _ in range(2)] == later


def test_async_and_sync_saves_are_the_same_checkpoint(one_thread, tmp_path: Path) -> None:
    a, b = tiny_demo_trainer(), tiny_demo_trainer()
    a.train(2)
    b.train(2)
    save_checkpoint(a, tmp_path / "sync")
    saver = AsyncCheckpointer(b, tmp_path / "async")
    saver.save()
    saver.close()
    sync_files = sorted(p.name for p in (tmp_path / "sync/step_2").iterdir())
    assert sync_files == sorted(p.name for p in (tmp_path / "async/step_2").iterdir())
    fa, fb = tiny_demo_trainer(), tiny_demo_trainer()
    load_checkpoint(fa, tmp_path / "sync/step_2")
    load_checkpoint(fb, tmp_path / "async/step_2")
    sa, sb = _snapshot(fa), _snapshot(fb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_failed_async_write_raises_at_wait_and_leaves_nothing(one_thread, tmp_path: Path) -> None:
    trainer = tiny_demo_trainer()
    trainer.train(1)
    gate = threading.Event()
    gate.set()
    full = OSError(errno.ENOSPC, "No space left on device")
    saver = AsyncCheckpointer(trainer, tmp_path, storage_writer=lambda path: GatedWriter(path, gate, full))
    saver.save()
    trainer.train_step()  # training is not interrupted by the failure ...
    with pytest.raises(CheckpointWriteError, match="No space left on device") as err:
        saver.close()  # ... it is reported when the save is waited for
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # the .tmp folder was removed; nothing resumable appeared
    assert resumable_checkpoint(tmp_path).path is None


@pytest.mark.slow
def test_bench_smoke_reports_sync_and_async_stalls() -> None:
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "bench.async_checkpoint", "--smoke"], cwd=root, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "OUT": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert len(res["sync_stall_s"]) == len(res["async_stall_s"]) == 2 and res["checkpoint_gib"] > 0
    # staging into reused host buffers holds training for a fraction of a synchronous write + checksums
    assert res["stall_ratio_steady"] < 0.5, res
    assert all(w >= s for w, s in zip(res["async_write_s"], res["async_stall_s"]))

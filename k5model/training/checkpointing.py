"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<dir>/step_<N>/``: DCP shards + ``.metadata`` holding model, optimizer and EMA (each rank writes only
its own shards; ``get_state_dict`` never gathers a full state dict) and ``rank<r>.pt`` with that rank's data-source
state, RNG states and step (these differ per rank, and DCP would de-duplicate equal keys across ranks).
Atomicity: everything is written into ``step_<N>.tmp`` and renamed by rank 0 after a barrier, so a directory named
``step_<N>`` is always complete; a SIGKILL mid-save leaves only a ``.tmp`` that ``latest_checkpoint`` ignores.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from k5model.training.trainer import Trainer

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory`` (``.tmp`` leftovers are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").exists()]
    return max(found)[1] if found else None


def _sharded_state(trainer: Trainer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    return {"model": model_sd, "optim": optim_sd, "ema": trainer.ema.state_dict()}


def save_checkpoint(trainer: Trainer, directory: str | Path, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final ``step_<N>`` path."""
    directory = Path(directory)
    final = directory / f"step_{trainer.step}"
    tmp = directory / f"step_{trainer.step}.tmp"
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving this same step
    _barrier()
    dcp.save(_sharded_state(trainer), checkpoint_id=str(tmp))
    data_state = trainer.data.state_dict() if hasattr(trainer.data, "state_dict") else None
    torch.save({"step": trainer.step, "data": data_state, "rng": rng_state()}, tmp / f"rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        old = directory / f"step_{trainer.step}.old"
        if final.exists():  # re-saving a step (e.g. after resume): move the old copy aside, never half-delete it
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        steps = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)))
        for _, old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(trainer: Trainer, path: str | Path) -> int:
    """Restore model, optimizer, EMA, data source, RNG states and step in place; returns the step."""
    path = Path(path)
    state = _sharded_state(trainer)
    dcp.load(state, checkpoint_id=str(path))  # loads into the (sharded) tensors of ``state`` in place
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra = torch.load(path / f"rank{_rank()}.pt", weights_only=False)
    if extra["data"] is not None:
        trainer.data.load_state_dict(extra["data"])
    set_rng_state(extra["rng"])
    trainer.step = int(extra["step"])
    return trainer.step

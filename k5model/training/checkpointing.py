"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<dir>/step_<N>/``: DCP shards + ``.metadata`` holding model, optimizer and EMA (each rank writes only
its own shards; ``get_state_dict`` never gathers a full state dict) and ``rank<r>.pt`` with that rank's data-source
state, RNG states and step (these differ per rank, and DCP would de-duplicate equal keys across ranks).
Atomicity: everything is written into ``step_<N>.tmp`` and renamed by rank 0 after a barrier, so a directory named
``step_<N>`` is always complete; a SIGKILL mid-save leaves only a ``.tmp`` that ``latest_checkpoint`` ignores.
Integrity: ``checksums.json`` (size and SHA-256 of every other file of the folder; the ranks hash a share each) is
written last, inside ``.tmp``, before the rename. ``resumable_checkpoint`` verifies checkpoints newest first and
returns the newest that verifies, with the ones it skipped and why (a truncated or bit-flipped shard, a missing file),
so a damaged latest checkpoint costs the steps since the previous one instead of a crash or a silent NaN later.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from k5model.training.trainer import Trainer

_STEP_DIR = re.compile(r"^step_(\d+)$")
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from, or one that could not be written; the message says which,
    why and what to do."""


class CheckpointWriteError(CheckpointError):
    """Saving failed (``errno``: the OS error code, e.g. ENOSPC for a full disk; None if not an OS error); the
    previous checkpoints are untouched."""

    def __init__(self, message: str, errno_code: int | None = None):
        super().__init__(message)
        self.errno = errno_code


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier(group: Any = None) -> None:
    if _dist():
        dist.barrier(group=group)


def _gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` without a process group). ``group``: a group of all
    ranks (the checkpoint thread's own), default the world."""
    if not _dist():
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj, group=group)
    return out


def file_entry(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of one file (streamed: shards can be many GiB)."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def _payload_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(CHECKSUMS))


def _write_checksums(folder: Path, group: Any = None) -> None:
    """Collective: each rank hashes its share of the folder's files, rank 0 writes ``checksums.json`` (durably)."""
    names = _payload_files(folder)  # the same listing on every rank after the barrier (DCP needs a shared folder)
    share = {n: file_entry(folder / n) for n in names[_rank()::_world()]}
    entries: dict[str, Any] = {}
    for part in _gather(share, group):
        entries.update(part)
    if _rank() != 0:
        return
    for name in _payload_files(folder):  # a file another rank did not see yet (slow shared-FS listing)
        entries.setdefault(name, file_entry(folder / name))
    tmp = folder / (CHECKSUMS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"algorithm": "sha256", "files": dict(sorted(entries.items()))}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(folder / CHECKSUMS)


def _local_problem(path: Path) -> tuple[str | None, dict[str, Any]]:
    """Cheap checks (structure, listed files present with their sizes): (why not usable or None, listed files)."""
    if not (path / ".metadata").is_file():
        return "incomplete: no .metadata", {}
    try:
        files = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {CHECKSUMS}: written before checksums existed, or damaged; it cannot be verified", {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{CHECKSUMS} unreadable ({type(exc).__name__}: {exc})", {}
    for name, entry in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} missing", files
        if f.stat().st_size != entry["size"]:
            return f"{name} is {f.stat().st_size} bytes, {entry['size']} when saved (truncated or overwritten)", files
    return None, files


def verify_checkpoint(path: str | Path) -> str | None:
    """Collective when distributed (the ranks hash a share each). None when every file listed in ``checksums.json``
    is present with its recorded size and SHA-256; otherwise why not (the same answer on every rank)."""
    path = Path(path)
    problem, files = _local_problem(path)
    if problem is None:
        for name in sorted(files)[_rank()::_world()]:
            if file_entry(path / name)["sha256"] != files[name]["sha256"]:
                problem = f"{name} fails its SHA-256 check (corrupted after saving)"
                break
    return next((p for p in _gather(problem) if p is not None), None)


@dataclass(frozen=True)
class ResumePoint:
    """What ``resumable_checkpoint`` found: the checkpoint to resume (None: nothing usable) and the newer step
    folders it skipped, newest first, as (folder name, reason)."""

    path: Path | None
    skipped: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        skipped = "; ".join(f"skipped {name}: {why}" for name, why in self.skipped)
        target = f"resuming from {self.path.name}" if self.path else "no verified checkpoint"
        return f"{skipped}; {target}" if skipped else target


def resumable_checkpoint(directory: str | Path) -> ResumePoint:
    """Collective when distributed. The newest ``step_<N>`` folder of ``directory`` that is complete and passes
    ``verify_checkpoint``; newer ones that fail are skipped (and reported), ``.tmp`` leftovers ignored."""
    directory = Path(directory)
    steps = sorted(((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))),
                   reverse=True) if directory.is_dir() else []
    skipped: list[tuple[str, str]] = []
    for _, path in steps:
        problem = verify_checkpoint(path)
        if problem is None:
            return ResumePoint(path, tuple(skipped))
        skipped.append((path.name, problem))
    return ResumePoint(None, tuple(skipped))


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
    """The complete checkpoint with the highest step in ``directory`` (``.tmp`` leftovers are ignored). Cheap and not
    verified: resuming goes through ``resumable_checkpoint``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").exists()]
    return max(found)[1] if found else None


def _sharded_state(trainer: Trainer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    return {"model": model_sd, "optim": optim_sd, "ema": trainer.ema.state_dict()}


def _prepare_step_folder(directory: Path, step: int, group: Any = None) -> tuple[Path, Path]:
    """Collective: (final, tmp) folders of a save; a leftover ``.tmp`` of the same step is removed first."""
    final, tmp = directory / f"step_{step}", directory / f"step_{step}.tmp"
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving this same step
    _barrier(group)
    return final, tmp


def _rank_state(trainer: Trainer) -> bytes:
    """This rank's data-source state, RNG states and step, serialised now (they change with the next step)."""
    data_state = trainer.data.state_dict() if hasattr(trainer.data, "state_dict") else None
    buffer = io.BytesIO()  # torch.save's own file writer reports a full disk as a RuntimeError without errno
    torch.save({"step": trainer.step, "data": data_state, "rng": rng_state()}, buffer)
    return buffer.getvalue()


def _write_and_publish(state: dict[str, Any], rank_state: bytes, final: Path, tmp: Path, keep: int,
                       group: Any = None, storage_writer: Any = None) -> Path:
    """Collective over ``group``: shards + rank files + checksums into ``tmp``, then rank 0 renames it to ``final``
    (the only moment a resumable folder appears) and prunes all but the newest ``keep``."""
    directory = final.parent
    try:
        dcp.save(state, checkpoint_id=str(tmp), process_group=group,
                 storage_writer=storage_writer(tmp) if storage_writer is not None else None)
        with open(tmp / f"rank{_rank()}.pt", "wb") as fh:
            fh.write(rank_state)
        _barrier(group)
        _write_checksums(tmp, group)
    except (OSError, CheckpointException) as exc:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoints stay as they were
        raise _write_error(exc, final) from None
    _barrier(group)
    if _rank() == 0:
        old = directory / f"{final.name}.old"
        if final.exists():  # re-saving a step (e.g. after resume): move the old copy aside, never half-delete it
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        steps = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)))
        for _, old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(group)
    return final


def save_checkpoint(trainer: Trainer, directory: str | Path, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final ``step_<N>`` path once it is written and published."""
    final, tmp = _prepare_step_folder(Path(directory), trainer.step)
    return _write_and_publish(_sharded_state(trainer), _rank_state(trainer), final, tmp, keep)


class HostStager:
    """Host copies of a (sharded) state dict, in buffers allocated at the first ``stage`` and reused by every later one
    (pinned on GPU, so the device-to-host copies run as asynchronous DMA, synchronised once): torchtitan's staging.
    A state of another structure (a first save before the optimizer has state) allocates anew."""

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self.buffers: dict[str, Any] | None = None

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        for attempt in range(2):
            if self.buffers is None or attempt:
                self.buffers = _create_cpu_state_dict(state, pin_memory=self.pin_memory)
            try:
                staged = _copy_state_dict(state, self.buffers, non_blocking=self.pin_memory)
                break
            except (KeyError, ValueError, TypeError, RuntimeError):
                if attempt:
                    raise
        if self.pin_memory:
            torch.cuda.synchronize()  # the copies are complete before training touches the weights again
        return staged

    def close(self) -> None:
        self.buffers = None


class AsyncCheckpointer:
    """Non-blocking checkpoints. ``save()`` stages the sharded state (model, optimizer, EMA) into host buffers reused
    across saves (``HostStager``; pinned on GPU) and serialises the per-rank state, then returns;
    a background thread writes the DCP shards, the rank files and ``checksums.json`` into ``step_<N>.tmp`` and renames
    it to ``step_<N>``, exactly as ``save_checkpoint`` does. So a checkpoint only becomes resumable after its write
    and checksums are complete, and a process killed mid-write leaves a ``.tmp`` that resume ignores.

    One save is in flight at most: the next ``save()`` (and ``wait()``/``close()``) first waits for the previous one
    and raises its error (``CheckpointWriteError``). The thread's collectives run on a process group of their own
    (gloo), so they never interleave with the training step's. Collective: every rank constructs it and calls
    ``save``/``wait``/``close`` at the same steps. ``storage_writer``: ``tmp folder -> StorageWriter`` instead of
    DCP's file-system writer (e.g. another storage backend)."""

    def __init__(self, trainer: Trainer, directory: str | Path, keep: int = 2, storage_writer: Any = None):
        from concurrent.futures import ThreadPoolExecutor

        self.trainer, self.directory, self.keep, self.storage_writer = trainer, Path(directory), keep, storage_writer
        self.group = dist.new_group(backend="gloo") if _dist() else None
        self.stager = HostStager(pin_memory=trainer.device.type == "cuda")
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k5-checkpoint")
        self.pending: Any = None  # Future of the save in flight
        self.last_path: Path | None = None

    def save(self) -> float:
        """Start saving the trainer's current step; returns the seconds training was held (the stall): waiting for
        the previous save, plus staging to host memory."""
        import time

        t0 = time.perf_counter()
        self.wait()
        final, tmp = _prepare_step_folder(self.directory, self.trainer.step, self.group)
        staged = self.stager.stage(_sharded_state(self.trainer))  # a copy: the next optimizer step cannot touch it
        self.pending = self.executor.submit(_write_and_publish, staged, _rank_state(self.trainer), final, tmp,
                                            self.keep, self.group, self.storage_writer)
        return time.perf_counter() - t0

    def in_flight(self) -> bool:
        return self.pending is not None and not self.pending.done()

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is published; its path, or its CheckpointWriteError raised."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self.last_path = pending.result()
            return self.last_path
        return None

    def close(self) -> Path | None:
        """``wait()``, then release the thread and the staging buffers."""
        try:
            return self.wait()
        finally:
            self.executor.shutdown(wait=True)
            self.stager.close()


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, one a rank reported to DCP, or its cause/context."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        if isinstance(e, CheckpointException):
            todo += [pair[0] if isinstance(pair, tuple) else pair for pair in e.failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def _write_error(exc: BaseException, final: Path) -> CheckpointWriteError:
    os_err = os_error_in(exc)
    code = os_err.errno if os_err is not None else None
    reason = (f"{os.strerror(code)} ({os_err.filename or final.parent})" if code
              else " ".join(str(exc).split())[:300])
    hint = ("free disk space or give --out a folder on a larger disk, then rerun with --resume"
            if code in (errno.ENOSPC, errno.EDQUOT) else "fix the cause, then rerun with --resume")
    return CheckpointWriteError(f"could not write checkpoint {final.name} in {final.parent}: {reason}; the previous "
                                f"checkpoints are intact; {hint}", code)


def load_checkpoint(trainer: Trainer, path: str | Path, verify: bool = True) -> int:
    """Restore model, optimizer, EMA, data source, RNG states and step in place; returns the step. Collective.
    ``verify``: check ``checksums.json`` first and raise CheckpointError naming the damage (False: the caller has
    just verified it, e.g. through ``resumable_checkpoint``)."""
    path = Path(path)
    if verify and (problem := verify_checkpoint(path)) is not None:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {problem}")
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

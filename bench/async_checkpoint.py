"""Checkpoint stall: how long a save holds training, synchronous (``save_checkpoint``: DCP write + checksums + atomic
rename) against asynchronous (``AsyncCheckpointer``: staging to host memory, the rest in a background thread), and
the step time while an asynchronous write is in flight. One process through the training composition root
(``k5cli.train_run``: the same model build, FSDP2 and synthetic batches as ``k5 train``).

    python -m bench.async_checkpoint                       # video_lite, 5 s at 512x768, bf16, AC (GPU)
    python -m bench.async_checkpoint --smoke               # tiny model on CPU; for CI
    python -m bench.async_checkpoint --dir /scratch/ckpt   # where checkpoints are written (default: a temp folder)

Target (issue 19): the asynchronous stall below 10% of a synchronous save. Each checkpoint is deleted after it is
measured, so the disk needs room for one (video_lite: fp32 weights + AdamW moments + EMA, ~32 GB).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import device_info, peak_gb, sync, write_result


def _folder_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--preset", default=None, help="model preset (default video_lite; tiny with --smoke)")
    ap.add_argument("--latent-size", default=None, help="HxW latent size (default 64x96, 8x8 with --smoke)")
    ap.add_argument("--frames", type=int, default=None, help="latent frames (default 31 = 5 s, 2 with --smoke)")
    ap.add_argument("--saves", type=int, default=None, help="saves per mode (default 3, 2 with --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="steps timed without a save (default 3)")
    ap.add_argument("--dir", default=None, help="checkpoint folder (default: a temporary folder)")
    a = ap.parse_args()
    from k5cli.train_run import build_data, build_model, init_distributed, resolve_stage
    from k5model.training.checkpointing import AsyncCheckpointer, save_checkpoint
    from k5model.training.job import TrainJob
    from k5model.training.trainer import Trainer

    cuda = torch.cuda.is_available()
    preset = a.preset or ("tiny" if a.smoke else "video_lite")
    size = a.latent_size or ("8x8" if a.smoke else "64x96")
    frames = a.frames or (2 if a.smoke else 31)
    saves, steps = a.saves or (2 if a.smoke else 3), a.steps or 3
    root = Path(a.dir or tempfile.mkdtemp(prefix="k5-ckpt-bench-"))
    rank, world = init_distributed()
    job = TrainJob.from_flat(stage="tiny_demo", preset=preset, latent_size=size, frames=frames, batch=1,
                             tasks="t2v=1.0", bf16=cuda, activation_checkpointing=cuda, out=str(root), text_len=64)
    stage = resolve_stage(job)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model, _ = build_model(job, stage, device, world)
    data = build_data(job, stage, model.config, rank, world, device)
    trainer = Trainer(model, stage, data, data.null_condition(), rank=rank, device=device)

    def step() -> float:
        t0 = time.perf_counter()
        trainer.train_step()  # reads the loss back: the device is synchronised
        return time.perf_counter() - t0

    for _ in range(2):
        step()  # warm-up (allocator, AdamW state)
    plain = [step() for _ in range(steps)]

    sync_stall, sizes = [], []
    for i in range(saves):
        sync()
        t0 = time.perf_counter()
        path = save_checkpoint(trainer, root / f"sync{i}", keep=1)
        sync_stall.append(time.perf_counter() - t0)
        sizes.append(_folder_gib(path))
        shutil.rmtree(root / f"sync{i}")
        step()

    saver = AsyncCheckpointer(trainer, root / "async", keep=1)
    async_stall, write_s, during, waited = [], [], [], []
    for _ in range(saves):
        sync()
        t0 = time.perf_counter()
        async_stall.append(saver.save())
        while saver.in_flight():  # train while the thread writes: what the overlap costs the steps
            during.append(step())
        t1 = time.perf_counter()
        saver.wait()
        waited.append(time.perf_counter() - t1)
        write_s.append(time.perf_counter() - t0)
        shutil.rmtree(root / "async")
    saver.close()
    if not a.dir:
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    res = {**device_info(cuda), "preset": preset, "latent_size": size, "frames": frames,
           "params": sum(p.numel() for p in model.parameters()), "checkpoint_gib": round(med(sizes), 3),
           "step_s": med(plain), "sync_stall_s": sync_stall, "async_stall_s": async_stall,
           "async_stall_first_s": async_stall[0],  # allocates (and pins) the staging buffers
           "stall_ratio": med(async_stall) / med(sync_stall),
           "stall_ratio_steady": med(async_stall[1:] or async_stall) / med(sync_stall),
           "async_write_s": write_s, "steps_during_write": len(during),
           "step_s_during_write": med(during) if during else None,
           "peak_gb": peak_gb(), "date": time.strftime("%Y-%m-%d")}
    write_result("async_checkpoint.json", res)


if __name__ == "__main__":
    main()

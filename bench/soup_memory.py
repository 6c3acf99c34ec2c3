"""Peak memory and time of a streamed model soup (``k5model.soup.merge_streamed``) of 9 members shaped like
video_pro's largest tensors.

    python -m bench.soup_memory                      # full size: visual block 0 + every non-block tensor of video_pro
    python -m bench.soup_memory --blocks 2 --keep    # more of the model; keep the members on disk
    python -m bench.soup_memory --smoke              # shapes / 16 per dimension (runs in tests)

The member tensors come from ``get_preset("video_pro")`` built on the meta device in its mixed-precision layout
(bf16, modulation and time embeddings fp32), so the largest tensor is a visual block's 36864 x 1024 fp32 modulation
(144 MiB). Members are random, written to disk first (sharded: the index-json path is exercised) and are not part of
the measurement. Only a slice of the model is used because 9 full 19B members (43 GB each) do not fit on a
workstation; the merge streams chunk by chunk, so its peak does not depend on how many tensors a member has.

What is measured (``measure_peak``), in this process, around the merge only:
- ``rss_peak_delta``: the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just
  before the merge) minus the resident set at that moment. It counts everything: torch's CPU tensors, the Python heap
  and the members' memory-mapped pages that safe_open touches. This is the figure compared with 3x the largest tensor.
- ``tracemalloc_peak``: what tracemalloc sees. torch allocates tensor storage with its own allocator and safetensors
  reads through a memory map, so tracemalloc sees neither; it only shows that no Python ``bytes`` copy of a tensor is
  made. It is reported, not relied on.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import re
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import device_info, write_result

ShapeSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def video_pro_specs(blocks: int = 1, scale: int = 1) -> ShapeSpec:
    """Name -> (shape, dtype) of video_pro's non-block tensors and its first ``blocks`` visual blocks, every dimension
    divided by ``scale`` (at least 1)."""
    from k5model.config import get_preset
    from k5model.crossdit import CrossDiT

    with torch.device("meta"):
        model = CrossDiT(get_preset("video_pro")).to_mixed_precision(torch.bfloat16)
    keep = tuple(f"visual_transformer_blocks.{b}." for b in range(blocks))
    return {k: (tuple(max(1, d // scale) for d in v.shape), v.dtype) for k, v in model.state_dict().items()
            if k.startswith(keep) or "blocks." not in k}


def largest(specs: ShapeSpec) -> tuple[str, int]:
    """(name, bytes) of the largest tensor."""
    key = max(specs, key=lambda k: math.prod(specs[k][0]) * specs[k][1].itemsize)
    return key, math.prod(specs[key][0]) * specs[key][1].itemsize


def write_members(root: Path, specs: ShapeSpec, n: int, *, shard_bytes: int = 2**30, seed: int = 0) -> list[Path]:
    """``n`` transformer folders of random tensors shaped by ``specs`` (uniform in [-1, 1) + the member index, so
    members differ), sharded at ``shard_bytes`` with a diffusers index json, each with video_pro's config.json.
    One shard is in memory at a time."""
    from safetensors.torch import save_file

    from k5model.checkpoint import CONFIG_NAME, INDEX_NAME
    from k5model.config import get_preset

    shards: list[list[str]] = [[]]
    size = 0
    for key, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    folders = []
    for i in range(n):
        folder = root / f"member_{i}"
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        weight_map = {}
        for s, keys in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{s:05d}-of-{len(shards):05d}.safetensors"
            tensors = {k: torch.empty(specs[k][0]).uniform_(-1, 1, generator=gen).add_(i).to(specs[k][1])
                       for k in keys}
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
            del tensors
        total = sum(math.prod(sh) * dt.itemsize for sh, dt in specs.values())
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (folder / CONFIG_NAME).write_text(json.dumps(get_preset("video_pro").to_json_dict()))
        folders.append(folder)
    return folders


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def measure_peak(fn: Callable[[], Any]) -> dict[str, float]:
    """Run ``fn`` once; its peak resident-set growth (VmHWM after a reset, minus VmRSS before), tracemalloc's peak
    and the seconds it took. Linux with glibc only (/proc/self/clear_refs, malloc_trim)."""
    gc.collect()
    # hand free heap pages back to the kernel first: memory glibc keeps resident after earlier frees (its trim
    # threshold grows to 64 MiB) could otherwise be reused by ``fn`` without raising the resident set
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    tracemalloc.start()
    tracemalloc.reset_peak()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    try:
        fn()
        seconds = time.perf_counter() - t0
        hwm = _status_kib("VmHWM")
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"rss_peak_delta_bytes": (hwm - rss0) * 1024, "tracemalloc_peak_bytes": traced, "seconds": seconds}


def run(*, blocks: int, scale: int, n_members: int, chunk_numel: int, workdir: Path, keep: bool) -> dict[str, Any]:
    import safetensors

    from k5model.soup import merge_streamed, soup_weights

    specs = video_pro_specs(blocks, scale)
    big_key, big_bytes = largest(specs)
    member_bytes = sum(math.prod(s) * d.itemsize for s, d in specs.values())
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        members = write_members(workdir, specs, n_members, shard_bytes=max(member_bytes // 3, 1))
        write_s = time.perf_counter() - t0
        weights = soup_weights([1] * n_members, "equal")
        out = workdir / "soup"
        peak = measure_peak(lambda: merge_streamed(members, weights, out, chunk_numel=chunk_numel, progress=False))
        # the output is the mean: check the largest tensor's first rows against a direct computation
        from safetensors import safe_open

        from k5model.checkpoint import INDEX_NAME, WEIGHTS_NAME

        def rows(folder: Path) -> torch.Tensor:
            index = folder / INDEX_NAME
            name = json.loads(index.read_text())["weight_map"][big_key] if index.exists() else WEIGHTS_NAME
            with safe_open(str(folder / name), framework="pt") as f:
                return f.get_slice(big_key)[0:4].clone()

        acc = torch.zeros_like(rows(members[0]), dtype=torch.float32)
        for m, w in zip(members, weights):
            acc.add_(rows(m).to(torch.float32, copy=True).mul_(w))
        exact = torch.equal(rows(out), acc.to(specs[big_key][1]))
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        **device_info(False), "safetensors": safetensors.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
        "members": n_members, "visual_blocks": blocks, "scale": scale, "tensors_per_member": len(specs),
        "member_bytes": member_bytes, "largest_tensor": big_key, "largest_shape": list(specs[big_key][0]),
        "largest_dtype": str(specs[big_key][1]), "largest_bytes": big_bytes, "chunk_numel": chunk_numel,
        "write_members_s": round(write_s, 2), "merge_s": round(peak["seconds"], 2),
        "merge_read_MBps": round(n_members * member_bytes / peak["seconds"] / 1e6, 1),
        "rss_peak_delta_bytes": peak["rss_peak_delta_bytes"], "tracemalloc_peak_bytes": peak["tracemalloc_peak_bytes"],
        "peak_over_largest": round(peak["rss_peak_delta_bytes"] / big_bytes, 3),
        "below_3x_largest": peak["rss_peak_delta_bytes"] < 3 * big_bytes, "largest_rows_exact": exact,
    }


def main() -> None:
    from k5model.soup import DEFAULT_CHUNK_NUMEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="shapes / 16 per dimension, chunk / 256 (CPU test run)")
    ap.add_argument("--members", type=int, default=9)
    ap.add_argument("--blocks", type=int, default=1, help="visual blocks of video_pro in each member")
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this")
    ap.add_argument("--chunk-numel", type=int, default=None,
                    help=f"merge chunk (default {DEFAULT_CHUNK_NUMEL} / scale^2)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the members are written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the members and the soup on disk")
    args = ap.parse_args()
    scale = 16 if args.smoke else args.scale
    chunk = args.chunk_numel or max(1, DEFAULT_CHUNK_NUMEL // scale**2)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soup_memory_"))
    res = run(blocks=args.blocks, scale=scale, n_members=args.members, chunk_numel=chunk, workdir=workdir,
              keep=args.keep)
    write_result("soup_memory.json", res)


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmarks: timing, error metric, device set-up, the diffusers twin, local servers, output.

Model-level helpers live in the library: random weights and forward inputs in ``k5model.synthetic``, model FLOPs in
``k5model.training.throughput.forward_flops``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the whole tensor, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def timed(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` calls (CUDA events on GPU, perf_counter on CPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def video_setup(smoke: bool, seconds: int):
    """(cuda, device, dtype, preset config, (latent frames, h, w, text tokens)) of a benchmark: video_lite at
    512×768 for ``seconds`` in bf16 on a GPU, the tiny preset in fp32 on CPU (``smoke`` forces CPU)."""
    from k5model import get_preset

    cuda = torch.cuda.is_available() and not smoke
    shape = (seconds * 24 // 4 + 1, 64, 96, 256) if cuda else (3, 16, 16, 8)
    return (cuda, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32,
            get_preset("video_lite" if cuda else "tiny"), shape)


def diffusers_twin(cfg, ours: torch.nn.Module, device, dtype):
    """diffusers' Kandinsky5Transformer3DModel with our weights, its fp32 modules kept fp32 as from_pretrained does."""
    from diffusers import Kandinsky5Transformer3DModel

    ref = Kandinsky5Transformer3DModel(**cfg.to_dict())
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    ref = ref.to(device, dtype).eval()
    for name, module in ref.named_modules():
        if name.split(".")[-1] in Kandinsky5Transformer3DModel._keep_in_fp32_modules:
            module.float()
    return ref


def device_info(cuda: bool) -> dict[str, str]:
    """The first keys of every result: the device's name and torch's version."""
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_MOTO_SERVERS_OPEN = [0]


def _reset_moto_state(endpoint: str) -> None:
    """Empty moto's backends. They are process-global: every in-process server shares them, so without this a
    server started later sees the buckets and objects an earlier (already stopped) one left behind."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).read()


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """A local moto S3 server for the duration of the block; yields its endpoint URL. The first server opened in
    a process starts empty and the last one closed leaves nothing behind; servers open at the same time share one
    state (moto keeps it per process), so they need distinct bucket names."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    if _MOTO_SERVERS_OPEN[0] == 0:
        _reset_moto_state(endpoint)
    _MOTO_SERVERS_OPEN[0] += 1
    try:
        yield endpoint
    finally:
        _MOTO_SERVERS_OPEN[0] -= 1
        if _MOTO_SERVERS_OPEN[0] == 0:
            _reset_moto_state(endpoint)
        server.stop()


def write_result(name: str, res: dict[str, Any]) -> None:
    """Print the result and, on the device machine, keep it under $OUT."""
    print(json.dumps(res, indent=1), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(json.dumps(res, indent=1))


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


# kernel-name fragments per category, first match wins (cuDNN's attention kernels also say "cudnn")
TRANSFORMER_KERNELS = {
    "attention": ("fmha", "flash", "cudnn", "attn", "attention", "sdpa", "flex"),
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90_"),
}
CONV_KERNELS = {"conv": ("conv", "fprop", "implicit", "xmma", "cudnn", "sm90_"), "matmul": ("gemm", "nvjet", "cutlass"),
                "attention": ("fmha", "flash", "attention", "sdpa")}


def kernel_breakdown(fn: Callable[[], Any], categories: dict[str, tuple[str, ...]] | None = None,
                     top: int = 16) -> dict:
    """GPU kernel time of one call of ``fn`` (after one unprofiled call) per category plus the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    categories = TRANSFORMER_KERNELS if categories is None else categories
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cats = {f"{c}_ms": 0.0 for c in categories} | {"other_ms": 0.0}
    kernels = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:
            continue
        ms = e.self_device_time_total / 1000
        name = e.key.lower()
        cat = next((c for c, frags in categories.items() if any(f in name for f in frags)), "other")
        cats[f"{cat}_ms"] += ms
        kernels.append((ms, e.key[:90], e.count))
    kernels.sort(reverse=True)
    cats["top"] = [f"{ms:.1f} ms x{n} {k}" for ms, k, n in kernels[:top]]
    return cats

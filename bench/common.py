"""Helpers shared by the GPU benchmarks: timing, error metric, random weights, inputs, the diffusers twin, output."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
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


def randomize(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """N(0, std) for every parameter, the zero-initialised modulations included (so no block is an identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def forward_flops(cfg, tokens: int, text_len: int) -> float:
    """Matmul + attention FLOPs of one CrossDiT forward over the visual blocks (2 per multiply-add)."""
    d, f = cfg.model_dim, cfg.ff_dim
    per_block = 2 * tokens * (4 * d * d + 2 * d * f)  # self-attn qkvo + MLP
    per_block += 2 * tokens * 2 * d * d + 2 * text_len * 2 * d * d  # cross q,o on visual; k,v on text
    per_block += 4 * tokens * tokens * d + 4 * tokens * text_len * d  # self + cross attention scores/values
    return cfg.num_visual_blocks * per_block


def video_setup(smoke: bool, seconds: int):
    """(cuda, device, dtype, preset config, (latent frames, h, w, text tokens)) of a benchmark: video_lite at
    512×768 for ``seconds`` in bf16 on a GPU, the tiny preset in fp32 on CPU (``smoke`` forces CPU)."""
    from k5model import get_preset

    cuda = torch.cuda.is_available() and not smoke
    shape = (seconds * 24 // 4 + 1, 64, 96, 256) if cuda else (3, 16, 16, 8)
    return (cuda, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32,
            get_preset("video_lite" if cuda else "tiny"), shape)


def build_inputs(cfg, frames: int, h: int, w: int, text_len: int, device, dtype, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of one CrossDiT / diffusers forward on a (frames, h, w) latent (512×768 ↔ 64×96)."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, frames, h, w, cfg.visual_embed_dim, generator=gen).to(device, dtype),
        encoder_hidden_states=torch.randn(1, text_len, cfg.in_text_dim, generator=gen).to(device, dtype),
        timestep=torch.tensor([700.0], device=device),
        pooled_projections=torch.randn(1, cfg.in_text_dim2, generator=gen).to(device, dtype),
        visual_rope_pos=[torch.arange(frames, device=device), torch.arange(h // 2, device=device),
                         torch.arange(w // 2, device=device)],
        text_rope_pos=torch.arange(text_len, device=device),
        scale_factor=(1.0, 2.0, 2.0),
    )


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

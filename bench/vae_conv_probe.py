"""Which formulation of the VAE encoder's 3×3×3 causal convolutions runs fastest on this GPU.

The HunyuanVideo encoder is conv-bound (≈430 TFLOP at 121×512×768), so the conv kernel decides its speed. For the
encoder's shapes at one 16-frame chunk (buffer = 2 cached frames + 16 new, spatially padded) this times, fp16:

* ``conv3d_ncdhw``: ``F.conv3d`` on contiguous tensors (what diffusers runs);
* ``conv3d_ndhwc``: the same on channels-last-3d tensors;
* ``taps_conv2d``: one NHWC ``F.conv2d`` per temporal tap over the frames as a batch (views of a channels-last-3d
  buffer), summed — kt conv2d calls instead of one conv3d;
* ``stacked_conv2d``: the kt frames of each output stacked along channels (kt·C input channels), one NHWC conv2d;
  the stacking copy is timed separately (``stack_ms``).

Each prints ms and TFLOP/s (2·27·Cin·Cout per output voxel) and the rel. error against the fp32 conv3d.

    python -m bench.vae_conv_probe            # CUDA
    python -m bench.vae_conv_probe --smoke    # CPU, tiny shapes
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import device_info, rel, timed, write_result

# (name, c_in, c_out, new frames, H, W, temporal stride, spatial stride) of the encoder at 512×768, 16-frame chunks
SHAPES = [
    ("L0_128", 128, 128, 16, 512, 768, 1, 1),
    ("L0_down", 128, 128, 16, 512, 768, 1, 2),
    ("L1_256", 256, 256, 16, 256, 384, 1, 1),
    ("L1_128to256", 128, 256, 16, 256, 384, 1, 1),
    ("L1_down", 256, 256, 16, 256, 384, 2, 2),
    ("L2_512", 512, 512, 8, 128, 192, 1, 1),
    ("L3_512", 512, 512, 4, 64, 96, 1, 1),
]


def taps_conv2d(buf: torch.Tensor, taps: list[torch.Tensor], bias: torch.Tensor, st: int, ss: int) -> torch.Tensor:
    """buf (1, C, T, Hp, Wp) channels-last-3d; one conv2d per temporal tap (``taps``: NHWC weights), summed."""
    kt = len(taps)
    t_out = (buf.shape[2] - kt) // st + 1
    out = None
    for tau in range(kt):
        frames = buf[0, :, tau: tau + (t_out - 1) * st + 1: st].transpose(0, 1)  # (T_out, C, Hp, Wp) NHWC view
        y = F.conv2d(frames, taps[tau], bias if tau == 0 else None, stride=ss)
        out = y if out is None else out.add_(y)
    return out


def stack_frames(buf: torch.Tensor, kt: int, st: int) -> torch.Tensor:
    """(1, C, T, Hp, Wp) -> (T_out, kt·C, Hp, Wp) NHWC: output frame t sees input frames t·st .. t·st+kt-1."""
    c, t, hp, wp = buf.shape[1:]
    t_out = (t - kt) // st + 1
    out = torch.empty((t_out, hp, wp, kt, c), dtype=buf.dtype, device=buf.device)
    src = buf[0].permute(1, 2, 3, 0)  # (T, Hp, Wp, C)
    for tau in range(kt):
        out[:, :, :, tau] = src[tau: tau + (t_out - 1) * st + 1: st]
    return out.view(t_out, hp, wp, kt * c).permute(0, 3, 1, 2)


def probe_shape(cin: int, cout: int, t: int, h: int, w: int, st: int, ss: int, device: torch.device,
                dtype: torch.dtype, reps: int) -> dict:
    """ms, TFLOP/s and rel. error of each formulation for one conv: buffer of 2 cached + ``t`` frames, padded."""
    gen = torch.Generator().manual_seed(0)
    buf = torch.randn(1, cin, t + 2, h + 2, w + 2, generator=gen).to(device, dtype)
    weight = (torch.randn(cout, cin, 3, 3, 3, generator=gen) / (27 * cin) ** 0.5).to(device, dtype)
    bias = torch.randn(cout, generator=gen).to(device, dtype)
    stride = (st, ss, ss)
    ref = F.conv3d(buf.float(), weight.float(), bias.float(), stride=stride)
    flop = 2 * 27 * cin * cout * ref[0, 0].numel()
    row: dict = {"gflop": flop / 1e9}

    def record(tag: str, fn, frames_first: bool = False) -> None:
        with torch.no_grad():
            out = fn()
            row[f"{tag}_err"] = rel(out.transpose(0, 1)[None] if frames_first else out, ref)
            s = timed(fn, reps)
        row[f"{tag}_ms"] = s * 1e3
        row[f"{tag}_tflops"] = flop / s / 1e12

    record("conv3d_ncdhw", lambda: F.conv3d(buf, weight, bias, stride=stride))
    buf_cl = buf.to(memory_format=torch.channels_last_3d)
    w_cl = weight.to(memory_format=torch.channels_last_3d)
    record("conv3d_ndhwc", lambda: F.conv3d(buf_cl, w_cl, bias, stride=stride))
    w_taps = [weight[:, :, tau].contiguous(memory_format=torch.channels_last) for tau in range(3)]
    record("taps_conv2d", lambda: taps_conv2d(buf_cl, w_taps, bias, st, ss), frames_first=True)
    w_stack = weight.permute(0, 3, 4, 2, 1).reshape(cout, 3, 3, 3 * cin).permute(0, 3, 1, 2)  # (kt, C) channels
    stacked = stack_frames(buf_cl, 3, st)
    record("stacked_conv2d", lambda: F.conv2d(stacked, w_stack, bias, stride=ss), frames_first=True)
    row["stack_ms"] = timed(lambda: stack_frames(buf_cl, 3, st), reps) * 1e3
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    reps = args.reps if cuda else 1
    torch.backends.cudnn.benchmark = True
    res: dict = {**device_info(cuda), "cudnn": torch.backends.cudnn.version()}
    shapes = SHAPES if cuda else [(n, 16, 16, 4, 16, 24, st, ss) for n, _, _, _, _, _, st, ss in SHAPES[:3]]
    for name, cin, cout, t, h, w, st, ss in shapes:
        res[name] = probe_shape(cin, cout, t, h, w, st, ss, device, dtype, reps)
        print(name, {k: round(v, 4) for k, v in res[name].items()}, flush=True)
        if cuda:
            torch.cuda.empty_cache()
    write_result("vae_conv_probe.json", res)


if __name__ == "__main__":
    main()

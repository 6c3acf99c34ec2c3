"""CrossDiT vs diffusers' Kandinsky5Transformer3DModel: one forward (one NFE) and training steps, same weights.

Same process, same inputs, median of ``--reps`` timed runs after warm-up, CUDA events. Prints absolute seconds,
ratios (diffusers / ours) and the relative error ‖out − ref‖/‖ref‖ of each bf16 path against our plain fp32 path.
The anchor is diffusers at its best: ``compile_repeated_blocks`` with each of ``--diffusers-backends`` (its default
SDPA and ``_native_cudnn``); ``speedup_vs_diffusers_best`` is against the fastest, ``speedup_vs_diffusers_compiled``
against the default backend (what the first passes in docs/benchmarks.md compared with).

    python -m bench.crossdit_speed --train --profile      # GPU: video_lite, 512x768, 5 s
    python -m bench.crossdit_speed --seconds 10 --nabla --train --train-sac 0.5
    python -m bench.crossdit_speed --smoke --train        # CPU, tiny preset: the code path the test suite runs

With ``--nabla`` the anchor is diffusers' dense model (its NABLA path does not compile on H100, see issue 7) and ours
is timed with the CDF rule (reporting the density it chose on random weights), with the CDF selection forced to 10%
(STA added on top) and with the total density forced to 10% (STA blocks counted inside).
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench.common import device_info, diffusers_twin, kernel_breakdown, peak_gb, rel, timed, video_setup, write_result
from k5model import CrossDiT
from k5model.config import NABLA_10S
from k5model.runtime_options import NablaOptions
from k5model.synthetic import forward_inputs, randomize
from k5model.torch_patches import raise_recompile_limit
from k5model.training.parallel import apply_activation_checkpointing
from k5model.training.throughput import forward_flops

# the sparse setting the targets are about: 10% of the blocks in every row, STA blocks counted inside
FORCED_TOTAL_10PCT = NablaOptions(force_density=0.1, force_total=True)


def train_step(cfg, state: dict, kw: dict, device, *, save_attention: float, reps: int, compile_blocks: bool,
               residual_fp32: bool = False, force_total_density: float | None = None, profile: bool = False) -> dict:
    """Seconds and peak memory of one optimiser step: fp32 master weights, bf16 autocast, per-block activation
    checkpointing (``save_attention`` = fraction of blocks whose attention outputs are kept), fused AdamW."""
    model = CrossDiT(cfg)
    model.load_state_dict(state)
    model.to(device).train()
    forced = force_total_density
    model.set_options(residual_dtype=torch.float32 if residual_fp32 else None,
                      nabla=NablaOptions(force_density=forced, force_total=forced is not None))
    apply_activation_checkpointing(model, save_attention=save_attention)
    if compile_blocks:
        model.compile_blocks()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=cuda)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**kw).sample.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, reps, warmup=2)
    out = {"s": seconds, "peak_gb": peak_gb()}
    if profile and cuda:
        out["profile"] = kernel_breakdown(step)
    return out


# inductor options worth a try on the compiled blocks (keys of torch._inductor.config)
INDUCTOR_VARIANTS = {
    # compile_blocks() tunes the block sizes of the fused norm/RoPE/modulation kernels on CUDA; this turns that off
    "nocdt": {"coordinate_descent_tuning": False},
}


# diffusers' attention backends worth timing on CUDA: its default ("native": torch SDPA, which picks flash) and cuDNN
DIFFUSERS_BACKEND_TAGS = {"native": "", "_native_cudnn": "_cudnn"}


def diffusers_backends(spec: str, cuda: bool) -> list[str]:
    """The backends named in ``spec`` (comma-separated); on CPU only the default one (cuDNN is CUDA-only)."""
    names = [b for b in spec.split(",") if b]
    return [b for b in names if cuda or b == "native"] or ["native"]


def best_anchor(res: dict, mode: str) -> None:
    """``diffusers_best_<mode>_s`` and ``diffusers_best_backend``: the fastest of the diffusers timings in ``res``."""
    timings = [(v, k) for k, v in res.items() if k.startswith("diffusers") and k.endswith(f"_{mode}_s")
               and "_best_" not in k]
    if timings:
        seconds, key = min(timings)
        res[f"diffusers_best_{mode}_s"] = seconds
        res["diffusers_best_backend"] = key.removeprefix("diffusers").removesuffix(f"_{mode}_s").strip("_") or "native"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--nabla", action="store_true")
    ap.add_argument("--nabla-modes", default="cdf,forced_cdf,forced_total",
                    help="compiled NABLA settings to time: cdf (the rule itself), forced_cdf, forced_total")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--diffusers-eager", action="store_true", help="also time diffusers uncompiled")
    ap.add_argument("--diffusers-backends", default="native,_native_cudnn",
                    help="diffusers attention backends to time (default 'native', cuDNN); the best is the anchor")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="kernel-time breakdown of our compiled forward")
    ap.add_argument("--train", action="store_true", help="also time training steps")
    ap.add_argument("--profile-train", action="store_true", help="kernel-time breakdown of each training step")
    ap.add_argument("--train-sac", default="0,1", help="fractions of blocks with saved attention to time")
    ap.add_argument("--train-only", action="store_true", help="skip the forward timings")
    ap.add_argument("--residual", choices=("bf16", "fp32", "both"), default="both",
                    help="residual-stream dtype(s) of our compiled forward to time")
    ap.add_argument("--no-eager-timing", action="store_true", help="time compiled paths only")
    ap.add_argument("--no-ref", action="store_true", help="skip the fp32 reference forward and the error columns")
    ap.add_argument("--inductor-variants", default="",
                    help=f"extra inductor option sets to time our compiled forward with: {','.join(INDUCTOR_VARIANTS)}")
    args = ap.parse_args()
    modes = args.nabla_modes.split(",")
    # one compiled block code object serves every setting timed here (CDF rule, forced densities, density tracking,
    # residual dtypes); past dynamo's default recompile limit it would silently run the blocks eagerly
    raise_recompile_limit(64)
    cuda, device, dtype, dense_cfg, (frames, h, w, text_len) = video_setup(args.smoke, args.seconds)
    if not cuda:
        args.reps = 2
    cfg = dense_cfg.replace(**NABLA_10S) if args.nabla else dense_cfg
    tokens = frames * h * w // 4
    flops = forward_flops(cfg, tokens, text_len)
    res: dict = {**device_info(cuda), "preset": "video_lite" if cuda else "tiny", "frames_latent": frames,
                 "tokens": tokens, "attention": cfg.attention_type, "forward_tflop_dense": flops / 1e12}
    ours = randomize(CrossDiT(cfg)).to(device).eval()
    state = {k: v.detach().float().cpu().clone() for k, v in ours.state_dict().items()} if args.train else None
    kw = forward_inputs(cfg, frames, h, w, text_len, device=device, dtype=dtype)

    if not args.train_only:
        with torch.no_grad():
            # reference: our plain path in fp32 (SDPA; math attention would not fit at these lengths)
            kw32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
            ref = None if args.no_ref else ours(**kw32).sample
            if dtype != torch.float32:
                ours.to_mixed_precision(dtype)
            with ours.options_applied(nabla=NablaOptions(track_density=args.nabla)):
                out = ours(**kw).sample
            if ref is not None:
                res["ours_eager_rel_err"] = rel(out, ref)
            del out
            if args.nabla:
                res["nabla_density_cdf_rule"] = ours.last_nabla_density
                # densities of the forced settings, read here in eager mode: reading them synchronises and breaks the
                # compiled graph, so the compiled timings below never track
                for total in (False, True):
                    with ours.options_applied(nabla=NablaOptions(force_density=0.1, force_total=total,
                                                                 track_density=True)):
                        ours(**kw)
                    res[f"nabla_density_forced10pct_{'total' if total else 'cdf'}"] = ours.last_nabla_density
            if not args.no_eager_timing:
                res["ours_eager_s"] = timed(lambda: ours(**kw), args.reps)

        if not args.no_diffusers:
            try:
                twin = diffusers_twin(dense_cfg, ours, device, dtype)
            except ImportError as err:  # the device image has no diffusers unless carried as a wheel
                res["diffusers"] = f"not importable: {err}"
            else:
                with torch.no_grad():
                    if ref is not None:
                        res["diffusers_rel_err" if not args.nabla else "diffusers_dense_rel_err_vs_ours_nabla"] = rel(
                            twin(**kw).sample, ref)
                    # the anchor at its best and at its default: each attention backend timed (cuDNN is one call
                    # away for a diffusers user); keys without a backend tag are the default backend's
                    for backend in diffusers_backends(args.diffusers_backends, cuda):
                        tag = DIFFUSERS_BACKEND_TAGS.get(backend, f"_{backend.strip('_')}")
                        twin.set_attention_backend(backend)
                        if args.diffusers_eager:
                            res[f"diffusers{tag}_eager_s"] = timed(lambda: twin(**kw), args.reps)
                        if not args.no_compile:
                            torch._dynamo.reset()  # a fresh trace for this backend
                            twin.compile_repeated_blocks(fullgraph=False)
                            res[f"diffusers{tag}_compiled_s"] = timed(lambda: twin(**kw), args.reps)
                    best_anchor(res, "compiled")
                del twin
                gc.collect()

        if not args.no_compile:
            ours.compile_blocks()
            with torch.no_grad():
                for residual_fp32 in {"bf16": (False,), "fp32": (True,), "both": (False, True)}[args.residual]:
                    tag = "ours_compiled" + ("_residual_fp32" if residual_fp32 else "")
                    ours.set_options(residual_dtype=torch.float32 if residual_fp32 else None)
                    if ref is not None:
                        res[f"{tag}_rel_err"] = rel(ours(**kw).sample, ref)
                    if not args.nabla or "cdf" in modes:
                        res[f"{tag}_s"] = timed(lambda: ours(**kw), args.reps)
                    if args.nabla:
                        for total in [t for t, m in ((False, "forced_cdf"), (True, "forced_total")) if m in modes]:
                            sub = f"{tag}_forced10pct_{'total' if total else 'cdf'}"
                            with ours.options_applied(nabla=NablaOptions(force_density=0.1, force_total=total)):
                                res[f"{sub}_s"] = timed(lambda: ours(**kw), args.reps)
                ours.set_options(residual_dtype=None)
                best = min([(res[k], k) for k in ("ours_compiled_s", "ours_compiled_residual_fp32_s") if k in res]
                           or [(float("nan"), "")])
                if "diffusers_compiled_s" in res:
                    res["speedup_vs_diffusers_compiled"] = res["diffusers_compiled_s"] / best[0]  # default backend
                if "diffusers_best_compiled_s" in res:
                    res["speedup_vs_diffusers_best"] = res["diffusers_best_compiled_s"] / best[0]
                if not args.nabla:
                    res["ours_compiled_tflops"] = flops / best[0] / 1e12
                for name in filter(None, args.inductor_variants.split(",")):
                    ours.compile_blocks(options=INDUCTOR_VARIANTS[name])
                    with ours.options_applied(nabla=FORCED_TOTAL_10PCT if args.nabla else NablaOptions()):
                        res[f"ours_compiled_{name}{'_forced10pct_total' if args.nabla else ''}_s"] = timed(
                            lambda: ours(**kw), args.reps)
                if args.profile and cuda:
                    with ours.options_applied(nabla=FORCED_TOTAL_10PCT if args.nabla else NablaOptions()):
                        res["profile_compiled_forward"] = kernel_breakdown(lambda: ours(**kw))
        del ours
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    if args.train:
        for frac in (float(f) for f in args.train_sac.split(",")):
            common = dict(save_attention=frac, reps=max(3, args.reps // 2), compile_blocks=not args.no_compile,
                          profile=args.profile_train)
            if args.nabla:
                dense = train_step(dense_cfg, state, kw, device, **common)
                free_memory()
                sparse = train_step(cfg, state, kw, device, **common, force_total_density=0.1)
                res[f"train_sac{frac:g}"] = {"dense": dense, "nabla_total10pct": sparse,
                                             "nabla_speedup": dense["s"] / sparse["s"]}
            else:
                r = train_step(cfg, state, kw, device, **common)
                free_memory()
                r["model_tflops"] = 3 * flops / r["s"] / 1e12
                res[f"train_sac{frac:g}"] = r
            print(res[f"train_sac{frac:g}"], flush=True)
    write_result(f"speed_{args.seconds}s{'_nabla' if args.nabla else ''}.json", res)


if __name__ == "__main__":
    main()

"""The CPU smoke mode of every GPU benchmark runs the same code paths (ours and the diffusers anchor) on tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(module: str, *args: str, timeout: int = 240) -> str:
    """``python -m <module> <args>`` from the repository root, as the bench docstrings say to run them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": ""}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def last_json(out: str) -> dict:
    start = out.rindex("\n{") + 1 if "\n{" in out else out.index("{")
    return json.loads(out[start:])


def test_crossdit_speed_smoke_matches_diffusers():
    res = last_json(run_bench("bench.crossdit_speed", "--smoke", "--no-compile", "--train"))
    assert res["diffusers_rel_err"] < 1e-5  # same weights, same inputs, fp32 on CPU
    assert res["ours_eager_s"] > 0 and res["train_sac0"]["s"] > 0 and res["train_sac1"]["s"] > 0


def test_crossdit_speed_smoke_nabla_training():
    res = last_json(run_bench("bench.crossdit_speed", "--smoke", "--no-compile", "--nabla", "--train",
                              "--train-sac", "1"))
    assert 0 < res["nabla_density_cdf_rule"] <= 1
    assert res["train_sac1"]["dense"]["s"] > 0 and res["train_sac1"]["nabla_total10pct"]["s"] > 0


def test_generation_speed_smoke_matches_diffusers_loop():
    res = last_json(run_bench("bench.generation_speed", "--smoke", "--no-compile"))
    assert res["nfe"] == 6 and res["latent_rel_diff"] < 1e-5


def test_e2e_generation_smoke_times_every_phase_of_both_pipelines():
    res = last_json(run_bench("bench.e2e_generation", "--smoke", "--no-compile"))
    assert res["nfe"] == 4 and res["frames"] == 9
    for side, keys in (("ours", ("encode_s", "sample_s", "decode_s", "total_s")),
                       ("diffusers", ("encode_s", "vae_decode_s", "denoise_and_postprocess_s", "total_s"))):
        assert all(res[side][k] > 0 for k in keys), res[side]
    assert res["speedup_total"] > 0 and res["official_h100_fa3_s"] == 139.0


def test_dense_forward_probe_smoke():
    res = last_json(run_bench("bench.dense_forward_probe", "--smoke"))
    assert res["qk_prep_compiled_composite"]["ms"] > 0 and res["gelu"]["ms"] > 0
    assert res["forward_composite_s"] > 0 and res["forward_host_s"] > 0


def test_crossdit_gpu_check_smoke():
    res = last_json(run_bench("bench.crossdit_gpu_check", "--smoke"))
    assert res["nabla_out_rel_float32"] < 1e-5 and res["nabla_inference_out_rel_float32"] < 1e-5
    assert res["packed_flex_vs_alone_rel_max"] < 1e-5


def test_nabla_gpu_check_smoke():
    res = last_json(run_bench("bench.nabla_gpu_check", "--smoke"))
    assert res["bench"]["ms_nabla_fwd"] > 0


def test_loader_bench_smoke_meets_padding_target():
    import re

    out = run_bench("bench.loader", "--smoke")
    packed = float(re.search(r"packed \(t_max=\d+\): ([\d.]+)% real tokens", out).group(1))
    single = float(re.search(r"one-video-per-sample batches: ([\d.]+)% real tokens", out).group(1))
    assert packed >= 97.0 and single < packed


def test_vae_encode_bench_smoke():
    res = last_json(run_bench("bench.vae_encode", "--smoke", "--variants", "c16,c8"))
    assert res["ours_c16_max_dev"] < 1e-5  # one chunk holds all 17 frames: exact
    assert res["ours_c8_s"] > 0 and res["diffusers_tiled_s"] > 0


def test_vae_decode_bench_smoke():
    res = last_json(run_bench("bench.vae_decode", "--smoke", "--whole-clip", "--diffusers", "default,t32",
                              "--variants", "c2,c4"))
    assert res["ours_c4_max_dev_vs_whole"] < 1e-5  # one chunk holds all 5 latent frames: exact
    assert res["diffusers_t32_max_dev_vs_whole"] < 1e-4  # 17 frames fit one 32-frame tile: no tiling either
    assert res["diffusers_default_max_dev_vs_whole"] > res["ours_c2_max_dev_vs_whole"] > 0
    assert res["diffusers_best"] in ("default", "t32") and res["ours_c2_speedup_vs_diffusers_default"] > 0


def test_vae_conv_probe_smoke_formulations_agree():
    res = last_json(run_bench("bench.vae_conv_probe", "--smoke"))
    shapes = {k: v for k, v in res.items() if isinstance(v, dict)}
    assert set(shapes) == {"L0_128", "L0_down", "L1_256"}  # strides (1,1,1), (1,2,2) and a second channel count
    for row in shapes.values():
        for tag in ("conv3d_ncdhw", "conv3d_ndhwc", "taps_conv2d", "stacked_conv2d"):
            assert row[f"{tag}_err"] < 1e-5 and row[f"{tag}_ms"] > 0, (tag, row)


def test_soup_memory_smoke():
    res = last_json(run_bench("bench.soup_memory", "--smoke"))
    assert res["members"] == 9 and res["largest_shape"] == [36864 // 16, 1024 // 16]
    assert res["largest_rows_exact"] and res["merge_s"] > 0 and res["rss_peak_delta_bytes"] > 0

def test_bench_is_a_package_run_as_modules():
    """Every bench script imports as ``bench.<name>`` from the repository root, with no sys.path patch."""
    import ast

    names = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")
    for name in names:
        tree = ast.parse((ROOT / "bench" / f"{name}.py").read_text(encoding="utf-8"))
        patched = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                   and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not patched, f"bench/{name}.py touches sys.path at lines {patched}"
    code = "import importlib, sys; [importlib.import_module('bench.' + n) for n in sys.argv[1:]]"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

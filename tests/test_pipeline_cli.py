"""K5Pipeline on the tiny pipeline folders, media writing, and ``k5`` as a real subprocess (outputs and errors)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from k5cli.main import main
from k5model.media import save_media, to_uint8
from k5model.pipeline import DEFAULT_VIDEO_NEGATIVE, K5Pipeline, video_scale_factor

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def k5(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "k5cli.main", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def k5_inproc(*args: str | Path) -> subprocess.CompletedProcess:
    """The same command line through click in this process (no interpreter start-up); same result shape."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback would have reached the user
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert not proc.stdout.strip(), proc.stdout
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def t2v(tiny_t2v_dir) -> K5Pipeline:
    return K5Pipeline.from_pretrained(tiny_t2v_dir)


def test_to_uint8_and_save_media(tmp_path):
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 3.0, -7.0])).tolist() == [0, 128, 255, 255, 0]
    # the tensor path (converted on the tensor's device) gives the numpy path's bytes, ties included
    x = torch.cat([torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.8,
                   (torch.arange(256.0) + 0.5) / 127.5 - 1.0])
    assert np.array_equal(to_uint8(x), to_uint8(x.numpy())) and to_uint8(x).dtype == np.uint8
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    video = save_media(frames, tmp_path / "a" / "b" / "clip.mp4", fps=8)
    back = imageio.mimread(video)
    assert len(back) == 5 and back[0].shape == (32, 48, 3)
    png = save_media(frames[0], tmp_path / "img.png")
    assert np.array_equal(imageio.imread(png), frames[0])  # PNG is lossless
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["clip.mp4", "img.png"]  # no temp files
    with pytest.raises(ValueError, match="one frame"):
        save_media(frames, tmp_path / "many.png")
    with pytest.raises(ValueError, match="uint8"):
        save_media(frames.astype(np.float32), tmp_path / "f.png")


def test_scale_factor_rule():
    assert video_scale_factor(512, 768) == (1.0, 2.0, 2.0)
    assert video_scale_factor(480, 854) == (1.0, 2.0, 2.0)
    assert video_scale_factor(768, 1280) == (1.0, 3.16, 3.16)
    assert video_scale_factor(64, 64) == (1.0, 3.16, 3.16)


def test_generate_t2v_api(t2v):
    assert t2v.task == "t2v" and t2v.transformer.visual_cond
    r = t2v.generate("a red fox running through snow", height=64, width=96, num_frames=5, num_steps=2, seed=3,
                     progress=False)
    assert r.frames.shape == (5, 64, 96, 3) and r.frames.dtype == np.uint8
    assert r.latents.shape == (1, 2, 8, 12, 16)
    assert set(r.timings) >= {"encode_s", "sample_s", "decode_s", "total_s"}
    again = t2v.generate("a red fox running through snow", height=64, width=96, num_frames=5, num_steps=2, seed=3,
                         progress=False)
    assert torch.equal(r.latents, again.latents)
    other = t2v.generate("a red fox running through snow", height=64, width=96, num_frames=5, num_steps=2, seed=4,
                         progress=False)
    assert not torch.equal(r.latents, other.latents)
    # The default negative prompt is the official one: passing it explicitly changes nothing.
    explicit = t2v.generate("a red fox running through snow", negative_prompt=DEFAULT_VIDEO_NEGATIVE, height=64,
                            width=96, num_frames=5, num_steps=2, seed=3, progress=False)
    assert torch.equal(r.latents, explicit.latents)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(prompt="  "), "prompt"),
        (dict(height=72), "height=72"),
        (dict(width=100), "width=100"),
        (dict(num_frames=6), "num_frames=6"),
        (dict(image=np.zeros((64, 64, 3), np.uint8)), "image"),
    ],
)
def test_generate_rejects_bad_input(t2v, kwargs, needle):
    args = dict(prompt="a fox", height=64, width=64, num_frames=5, num_steps=1, progress=False) | kwargs
    with pytest.raises(ValueError, match=needle):
        t2v.generate(args.pop("prompt"), **args)


def test_nabla_models_need_multiples_of_128(tiny_t2v_dir):
    pipe = K5Pipeline.from_pretrained(tiny_t2v_dir)
    assert pipe.size_multiple == 16  # VAE 8 x patch 2
    pipe.transformer.config.attention_type = "nabla"
    assert pipe.size_multiple == 128
    with pytest.raises(ValueError, match="height=64 .* multiple of 128"):
        pipe.generate("a fox", height=64, width=128, num_frames=5, num_steps=1, progress=False)


def test_generate_i2v_api(tiny_i2v_dir):
    pipe = K5Pipeline.from_pretrained(tiny_i2v_dir)
    assert pipe.task == "i2v"
    with pytest.raises(ValueError, match="image"):
        pipe.generate("a fox", height=64, width=64, num_frames=5, num_steps=1, progress=False)
    img = np.random.default_rng(1).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    r = pipe.generate("a fox", height=64, width=64, num_frames=5, num_steps=2, image=img, progress=False)
    assert r.frames.shape == (5, 64, 64, 3)
    # Frame 0 of the result is exactly the encoded condition image (2 latent frames: no post-step).
    from k5model.pipeline import _image_to_pixels

    first = pipe.vae.encode(_image_to_pixels(img, 64, 64)).float()
    assert torch.equal(r.latents[:, :1], first)


def test_cli_generate_t2v_mp4(tiny_t2v_dir, tmp_path):
    out = tmp_path / "videos" / "fox.mp4"
    proc = k5("generate", tiny_t2v_dir, "--prompt", "a fox in the snow", "--out", out, "--height", "64", "--width",
              "64", "--frames", "5", "--steps", "2", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    frames = imageio.mimread(out)
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
    assert "sampling" in proc.stderr  # the tqdm bar


def test_cli_generate_t2i_png(tiny_t2i_dir, tmp_path):
    out = tmp_path / "fox.png"
    proc = k5("generate", tiny_t2i_dir, "--prompt", "a fox", "--out", out, "--height", "64", "--width", "96",
              "--steps", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert imageio.imread(out).shape == (64, 96, 3)


def test_cli_errors_subprocess(tiny_t2v_dir, tmp_path):
    """Real interpreter: exit code 2 and one line, both for an error found before loading and one found after."""
    out = tmp_path / "x.mp4"
    base = ["--out", out, "--height", "64", "--width", "64", "--frames", "5", "--steps", "1"]
    assert_one_line_error(k5("generate", tmp_path / "nope", "--prompt", "a fox", *base), "nope", "does not exist")
    assert_one_line_error(k5("generate", tiny_t2v_dir, "--prompt", "a fox", *base, "--height", "60"), "height=60")
    assert not out.exists()


def test_cli_errors(tiny_t2v_dir, tmp_path):
    out = tmp_path / "x.mp4"
    base = ["--out", out, "--height", "64", "--width", "64", "--frames", "5", "--steps", "1"]
    assert_one_line_error(k5_inproc("generate", tiny_t2v_dir, "--prompt", "", *base), "prompt")
    assert_one_line_error(k5_inproc("generate", tiny_t2v_dir, "--prompt", "a fox", *base, "--width", "120"),
                          "width=120")
    assert_one_line_error(k5_inproc("generate", tiny_t2v_dir, "--prompt", "a fox", *base, "--frames", "8"),
                          "num_frames=8")
    assert_one_line_error(k5_inproc("generate", tiny_t2v_dir, "--prompt", "a fox", "--out", tmp_path / "x.gif"),
                          ".gif")
    assert_one_line_error(k5_inproc("generate", tiny_t2v_dir, "--prompt", "a fox", "--out", tmp_path / "x.png"),
                          ".mp4")
    # A folder missing its VAE, and one whose transformer expects another text width.
    broken = tmp_path / "no_vae"
    shutil.copytree(tiny_t2v_dir, broken, ignore=shutil.ignore_patterns("vae"))
    assert_one_line_error(k5_inproc("generate", broken, "--prompt", "a fox", *base), "missing component", "vae")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_t2v_dir, mismatched)
    cfg_path = mismatched / "transformer" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "in_text_dim": 64}))
    assert_one_line_error(k5_inproc("generate", mismatched, "--prompt", "a fox", *base), "mismatched checkpoint",
                          "in_text_dim=64")
    assert not out.exists()


def test_cli_info():
    proc = k5("info", "video_pro")  # 19B on the meta device: instant, no memory
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("video_pro: 19.3") and "B parameters" in last
    assert "model_dim: 4096" in proc.stdout
    assert_one_line_error(k5_inproc("info", "video_huge"), "video_huge")

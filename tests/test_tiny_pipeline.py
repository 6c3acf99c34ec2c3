"""The tiny pipeline folders are valid diffusers Kandinsky 5 pipelines and load into our model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from k5model.tiny import COMPONENTS, build_tiny_pipeline

GEN = dict(height=64, width=64, num_inference_steps=2, output_type="np")


def test_model_index_matches_diffusers_layout(tiny_t2v_dir, tiny_i2v_dir, tiny_t2i_dir):
    expected = {
        tiny_t2v_dir: ("Kandinsky5T2VPipeline", "AutoencoderKLHunyuanVideo", 10.0, True),
        tiny_i2v_dir: ("Kandinsky5I2VPipeline", "AutoencoderKLHunyuanVideo", 10.0, True),
        tiny_t2i_dir: ("Kandinsky5T2IPipeline", "AutoencoderKL", 3.0, False),
    }
    for path, (cls, vae, shift, visual_cond) in expected.items():
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == cls
        assert set(COMPONENTS) <= set(index) and index["vae"] == ["diffusers", vae]
        assert index["transformer"] == ["diffusers", "Kandinsky5Transformer3DModel"]
        assert all((path / c).is_dir() for c in COMPONENTS)
        assert json.loads((path / "scheduler" / "scheduler_config.json").read_text())["shift"] == shift
        config = json.loads((path / "transformer" / "config.json").read_text())
        assert config["visual_cond"] is visual_cond and config["in_text_dim"] == 32 and config["in_text_dim2"] == 32


def test_rebuild_is_noop_and_deterministic(tmp_path, tiny_t2v_dir):
    before = {p: p.stat().st_mtime_ns for p in tiny_t2v_dir.rglob("*")}
    assert build_tiny_pipeline(tiny_t2v_dir, kind="t2v", seed=0) == tiny_t2v_dir
    assert {p: p.stat().st_mtime_ns for p in tiny_t2v_dir.rglob("*")} == before

    again = build_tiny_pipeline(tmp_path / "again", kind="t2v", seed=0)
    for name in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_t2v_dir / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    other = build_tiny_pipeline(tmp_path / "seed1", kind="t2v", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (other / name).read_bytes() != (tiny_t2v_dir / name).read_bytes()


def test_refuses_foreign_folder_and_bad_kind(tmp_path, tiny_t2v_dir):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_pipeline(tmp_path / "mine", kind="t2v")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError):  # complete, but a different kind
        build_tiny_pipeline(tiny_t2v_dir, kind="t2i")
    with pytest.raises(ValueError, match="kind"):
        build_tiny_pipeline(tmp_path / "x", kind="v2v")


def test_our_crossdit_loads_the_transformer(tiny_t2v_dir, tiny_t2i_dir):
    from k5model.crossdit import CrossDiT

    assert CrossDiT.from_pretrained(tiny_t2v_dir).config.visual_cond is True
    assert CrossDiT.from_pretrained(tiny_t2i_dir).config.visual_cond is False


def test_diffusers_t2v_pipeline_runs(tiny_t2v_dir):
    from diffusers import Kandinsky5T2VPipeline

    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny_t2v_dir, dtype=torch.float32, local_files_only=True)
    out = pipe(prompt="A cat on a sofa", num_frames=5, generator=torch.Generator().manual_seed(0), **GEN)
    frames = out.frames
    assert frames.shape == (1, 5, 64, 64, 3) and np.isfinite(frames).all()
    again = pipe(prompt="A cat on a sofa", num_frames=5, generator=torch.Generator().manual_seed(0), **GEN).frames
    np.testing.assert_array_equal(frames, again)


def test_diffusers_i2v_pipeline_runs(tiny_i2v_dir):
    from diffusers import Kandinsky5I2VPipeline

    pipe = Kandinsky5I2VPipeline.from_pretrained(tiny_i2v_dir, dtype=torch.float32, local_files_only=True)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    # 17 frames = 5 latent frames: diffusers' first-frame statistics fix-up reads latent frames 4.. (NaN with fewer).
    out = pipe(image=image, prompt="A cat", num_frames=17, generator=torch.Generator().manual_seed(0), **GEN)
    assert out.frames.shape == (1, 17, 64, 64, 3) and np.isfinite(out.frames).all()


def test_diffusers_t2i_pipeline_runs(tiny_t2i_dir):
    from diffusers import Kandinsky5T2IPipeline

    pipe = Kandinsky5T2IPipeline.from_pretrained(tiny_t2i_dir, dtype=torch.float32, local_files_only=True)
    # diffusers snaps T2I sizes to its supported list (64x64 -> 1024x1024); still a few seconds with tiny weights.
    out = pipe(prompt="A cat", generator=torch.Generator().manual_seed(0), **GEN)
    assert out.image.shape[0] == 1 and out.image.shape[-1] == 3 and np.isfinite(out.image).all()

"""CrossDiT as a drop-in for diffusers' transformer inside diffusers' own Kandinsky 5 pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Kandinsky5T2VPipeline

from k5model import CrossDiT
from k5model.runtime_options import AttentionOptions


@pytest.mark.parametrize("rope_cast, atol", [(torch.bfloat16, 1e-5), (None, 5e-3)])
def test_t2v_pipeline_same_video_with_our_transformer(tiny_t2v_dir, rope_cast, atol):
    torch.set_num_threads(1)
    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny_t2v_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red fox runs through snow", height=64, width=64, num_frames=5, num_inference_steps=3,
              guidance_scale=5.0, output_type="np")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames[0]

    ours = CrossDiT.from_pretrained(tiny_t2v_dir)
    # bf16 reproduces diffusers' rounding of rotated q/k; None is the official fp32
    ours.set_options(attention=AttentionOptions(rope_cast=rope_cast))
    pipe.transformer = ours
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames[0]
    assert out.shape == ref.shape == (5, 64, 64, 3)
    assert np.isfinite(out).all()
    # pixels in [0, 1]: identical with the bf16 emulation; within a few 1e-3 with fp32 RoPE (rounding only)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)

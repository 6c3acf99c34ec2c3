"""Euler sampler: official grid, hand-rolled loop parity, determinism, batched CFG, I2V."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import randomize

from k5model import CrossDiT, get_preset
from k5model.flow_matching import TextCondition
from k5model.sampling import (
    cfg_batch,
    guided_velocity,
    normalize_first_frames,
    sample,
    sampling_grid,
)

SHAPE = (1, 3, 4, 4, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> CrossDiT:
    # random everything, so time/text/pooled all change the output
    return randomize(CrossDiT(get_preset("tiny")), std=0.1, seed=0).eval()


def text(seed: int, length: int, batch: int = 1) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(batch, length, 32, generator=g), torch.ones(batch, length, dtype=torch.bool),
                         torch.randn(batch, 32, generator=g))


def raw_velocity(model: CrossDiT, x: torch.Tensor, cond: TextCondition, t: float) -> torch.Tensor:
    """A direct forward with no padding and no mask (what two sequential CFG forwards do)."""
    b, f, h, w, _ = x.shape
    return model(
        hidden_states=x, encoder_hidden_states=cond.embeds, timestep=torch.full((b,), t * 1000.0),
        pooled_projections=cond.pooled,
        visual_rope_pos=[torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)],
        text_rope_pos=torch.arange(cond.embeds.shape[1]), scale_factor=(1.0, 2.0, 2.0),
    ).sample


def t2v_input(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.zeros_like(x), torch.zeros(*x.shape[:-1], 1)], dim=-1)


def test_grid_is_the_official_one():
    grid = sampling_grid(50, 10.0)
    assert grid.shape == (51,) and grid[0] == 1.0 and grid[-1] == 0.0
    assert (grid[1:] < grid[:-1]).all()
    assert grid[-2].item() == pytest.approx(10 * 0.02 / (1 + 9 * 0.02), abs=1e-6)  # ≈ 0.1695 (notes)
    assert grid[-2].item() == pytest.approx(0.169, abs=1e-3)
    sched = FlowMatchEulerDiscreteScheduler(shift=10.0)
    sched.set_timesteps(50)
    assert sched.sigmas[-2].item() == pytest.approx(0.091, abs=2e-3)  # diffusers' grid differs, as documented
    assert torch.allclose(sampling_grid(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="num_steps"):
        sampling_grid(0, 3.0)


def test_euler_loop_matches_hand_rolled(model):
    steps, shift = 4, 3.0
    cond = text(1, 6)
    out = sample(model, latent_shape=SHAPE, cond=cond, guidance_scale=1.0, num_steps=steps, shift=shift, seed=7,
                 progress=False)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ts = [shift * (1 - i / steps) / (1 + (shift - 1) * (1 - i / steps)) for i in range(steps + 1)]
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = x + (t_next - t) * raw_velocity(model, t2v_input(x), cond, t)
    assert torch.allclose(out, x, atol=1e-5), (out - x).abs().max()


def test_sampler_is_deterministic_per_seed(model):
    kw = dict(latent_shape=SHAPE, cond=text(1, 6), uncond=text(2, 3), guidance_scale=5.0, num_steps=3, shift=10.0,
              progress=False)
    a, b = sample(model, seed=11, **kw), sample(model, seed=11, **kw)
    assert torch.equal(a, b)
    c = sample(model, generator=torch.Generator().manual_seed(11), **kw)
    assert torch.equal(a, c)
    assert not torch.allclose(a, sample(model, seed=12, **kw))


def test_batched_cfg_equals_two_sequential_forwards(model):
    cond, uncond = text(1, 7), text(2, 3)  # different lengths: the batch needs padding + mask
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    w, t = 5.0, 0.7
    with torch.no_grad():
        v_c, v_u = raw_velocity(model, t2v_input(x), cond, t), raw_velocity(model, t2v_input(x), uncond, t)
        expected = v_u + w * (v_c - v_u)
        batched = guided_velocity(model, t2v_input(x), t, cfg_batch(cond, uncond), w)
        sequential = guided_velocity(model, t2v_input(x), t, cond, w, batched_cfg=False, uncond=uncond)
    assert (v_c - v_u).abs().max() > 1e-2  # guidance really changes the result
    assert torch.allclose(batched, expected, atol=1e-5), (batched - expected).abs().max()
    assert torch.allclose(sequential, expected, atol=1e-5)
    kw = dict(latent_shape=SHAPE, cond=cond, uncond=uncond, guidance_scale=w, num_steps=3, seed=0, progress=False)
    assert torch.allclose(sample(model, **kw), sample(model, batched_cfg=False, **kw), atol=1e-5)


def test_guidance_one_runs_a_single_branch(model):
    kw = dict(latent_shape=SHAPE, cond=text(1, 6), num_steps=2, seed=0, progress=False)
    plain = sample(model, **kw)
    assert torch.equal(plain, sample(model, uncond=text(2, 4), guidance_scale=1.0, **kw))
    assert not torch.allclose(plain, sample(model, uncond=text(2, 4), guidance_scale=5.0, **kw))


def test_i2v_keeps_first_frame(model):
    first = torch.randn(1, 1, 4, 4, 16, generator=torch.Generator().manual_seed(5))
    out = sample(model, latent_shape=SHAPE, cond=text(1, 6), uncond=text(2, 3), num_steps=3, seed=0,
                 first_frame_latent=first, progress=False)
    assert torch.equal(out[:, :1], first)  # 3 latent frames: no post-step normalisation
    assert not torch.allclose(out[:, 1:], torch.zeros_like(out[:, 1:]))
    long = (1, 6, 4, 4, 16)
    raw = sample(model, latent_shape=long, cond=text(1, 6), num_steps=2, seed=0, first_frame_latent=first,
                 normalize_i2v=False, progress=False)
    assert torch.equal(raw[:, :1], first)
    normed = sample(model, latent_shape=long, cond=text(1, 6), num_steps=2, seed=0, first_frame_latent=first,
                    progress=False)
    assert torch.equal(normed, normalize_first_frames(raw))
    with pytest.raises(ValueError, match="first_frame_latent"):
        sample(model, latent_shape=SHAPE, cond=text(1, 6), num_steps=1, first_frame_latent=first[:, :, :2],
               progress=False)


def test_normalize_first_frames_hand_values():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 4, 2, 2, 16, generator=g)
    src = (src - src.mean()) / src.std()  # mean 0, std 1 exactly
    # Reference: small offset (within the clamps) for sample 0 -> matched exactly.
    ref = torch.randn(1, 5, 2, 2, 16, generator=g)
    ref = (ref - ref.mean()) / ref.std() * 1.2 + 0.07
    out = normalize_first_frames(torch.cat([src, ref], dim=1))
    assert torch.allclose(out[:, :4], src * 1.2 + 0.07, atol=1e-5)
    assert torch.equal(out[:, 4:], ref)
    # Far-away reference: the move is clamped to mean + 0.1 and std + 0.25.
    far = ref * 10 + 5
    out = normalize_first_frames(torch.cat([src, far], dim=1))
    assert torch.allclose(out[:, :4], src * 1.25 + 0.1, atol=1e-5)
    # Only frames 4..8 are the reference.
    tail = torch.cat([src, ref, torch.full((1, 3, 2, 2, 16), 100.0)], dim=1)
    assert torch.allclose(normalize_first_frames(tail)[:, :4], src * 1.2 + 0.07, atol=1e-5)
    short = torch.cat([src], dim=1)
    assert torch.equal(normalize_first_frames(short), short)  # nothing to compare with

"""Flow-matching maths against hand-computed values, the 33-channel input, I2V training semantics, and an overfit
run."""

from __future__ import annotations

import pytest
import torch

from k5model import CrossDiT, get_preset
from k5model.flow_matching import (
    TextCondition,
    drop_text_condition,
    flow_matching_loss,
    model_timestep,
    noise_latents,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, visual_cond: bool = True) -> CrossDiT:
    torch.manual_seed(seed)
    model = CrossDiT(get_preset("tiny", visual_cond=visual_cond))
    # Zero-initialised modulations would make the output ignore time and text; give them values.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return model


def capture_input(model: CrossDiT) -> list[torch.Tensor]:
    """Record the (B, T, H, W, C_in) input of the patch embedding (a real forward hook)."""
    seen: list[torch.Tensor] = []
    model.visual_embeddings.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    return seen


def test_noise_latents_and_target_hand_values():
    x0 = torch.full((2, 1, 2, 2, 16), 2.0)
    eps = torch.full((2, 1, 2, 2, 16), -1.0)
    x_t = noise_latents(x0, eps, torch.tensor([0.25, 1.0]))
    assert torch.allclose(x_t[0], torch.full_like(x_t[0], 0.75 * 2 + 0.25 * -1))  # 1.25
    assert torch.equal(x_t[1], eps[1])  # t=1 is pure noise
    assert torch.equal(noise_latents(x0, eps, 0.0), x0)  # t=0 is data
    assert torch.equal(velocity_target(x0, eps), torch.full_like(x0, -3.0))
    # The target is the time derivative of the path.
    h = 1e-3
    fd = (noise_latents(x0, eps, 0.5 + h) - noise_latents(x0, eps, 0.5 - h)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x0, eps), atol=1e-3)


def test_shift_timesteps_hand_values():
    assert shift_timesteps(0.5, 3.0) == pytest.approx(0.75)  # 1.5 / 2
    assert shift_timesteps(0.02, 10.0) == pytest.approx(0.2 / 1.18)
    t = torch.tensor([0.0, 0.3, 1.0])
    assert torch.allclose(shift_timesteps(t, 5.0), torch.tensor([0.0, 1.5 / 2.2, 1.0]))
    assert torch.equal(shift_timesteps(t, 1.0), t)


def test_sample_timesteps():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    u = sample_timesteps(1000, "uniform", generator=g1)
    raw = torch.rand(1000, generator=g2)
    assert torch.equal(u, raw) and u.dtype == torch.float32
    s = sample_timesteps(1000, "uniform", shift=5.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(s, 5 * raw / (1 + 4 * raw))
    ln = sample_timesteps(4000, "logit_normal", loc=1.0, scale=0.5, generator=torch.Generator().manual_seed(0))
    logits = torch.log(ln / (1 - ln))
    assert abs(logits.mean().item() - 1.0) < 0.05 and abs(logits.std().item() - 0.5) < 0.05
    with pytest.raises(ValueError, match="cosine"):
        sample_timesteps(4, "cosine")


def test_model_timestep_is_fp32_times_1000():
    ts = model_timestep(torch.tensor([0.5, 0.1234567], dtype=torch.float64))
    assert ts.dtype == torch.float32
    assert torch.allclose(ts, torch.tensor([500.0, 123.4567]))
    assert torch.equal(model_timestep(0.25, batch=3), torch.full((3,), 250.0))


def test_drop_text_condition():
    g = torch.Generator().manual_seed(0)
    cond = TextCondition(torch.randn(8, 5, 4, generator=g), torch.ones(8, 5, dtype=torch.bool), torch.randn(8, 3))
    null = TextCondition(torch.randn(1, 2, 4, generator=g), torch.ones(1, 2, dtype=torch.bool), torch.randn(1, 3))
    kept, drop = drop_text_condition(cond, null, 0.0)
    assert not drop.any() and torch.equal(kept.embeds, cond.embeds) and torch.equal(kept.mask, cond.mask)
    gone, drop = drop_text_condition(cond, null, 1.0)
    assert drop.all()
    assert torch.equal(gone.embeds[:, :2], null.embeds.expand(8, -1, -1)) and not gone.embeds[:, 2:].any()
    assert gone.mask.sum(1).tolist() == [2] * 8  # the empty prompt's padding is masked out
    assert torch.equal(gone.pooled, null.pooled.expand(8, -1))
    mixed, drop = drop_text_condition(cond, null, 0.5, generator=torch.Generator().manual_seed(1))
    assert 0 < drop.sum() < 8
    assert torch.equal(drop, torch.rand(8, generator=torch.Generator().manual_seed(1)) < 0.5)  # per-sample draw
    for i in range(8):
        src = null if drop[i] else cond
        j = 0 if drop[i] else i
        n = src.embeds.shape[1]
        assert torch.equal(mixed.embeds[i, :n], src.embeds[j]) and torch.equal(mixed.pooled[i], src.pooled[j])


def test_loss_t2v_input_and_value():
    model = tiny_model()
    seen = capture_input(model)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 2, 4, 4, 16, generator=g), torch.randn(2, 2, 4, 4, 16, generator=g)
    emb, pooled = torch.randn(2, 3, 32, generator=g), torch.randn(2, 32, generator=g)
    t = torch.tensor([0.3, 0.8])
    loss, aux = flow_matching_loss(model, x0, emb, None, pooled, t=t, noise=eps)
    inp = seen[0]
    assert inp.shape == (2, 2, 4, 4, 33)
    assert torch.allclose(inp[0, ..., :16], 0.7 * x0[0] + 0.3 * eps[0], atol=1e-6)
    assert torch.allclose(inp[1, ..., :16], 0.2 * x0[1] + 0.8 * eps[1], atol=1e-6)
    assert not inp[..., 16:].any()  # T2V: zero condition, zero mask
    assert torch.allclose(loss, ((aux["pred"] - (eps - x0)) ** 2).mean(), rtol=1e-6)
    assert aux["pred"].shape == x0.shape


def test_loss_i2v_keeps_first_frame_clean_and_out_of_the_loss():
    model = tiny_model()
    seen = capture_input(model)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, 16, generator=g), torch.randn(2, 3, 4, 4, 16, generator=g)
    emb, pooled = torch.randn(2, 3, 32, generator=g), torch.randn(2, 32, generator=g)
    sel = torch.tensor([True, False])
    loss, aux = flow_matching_loss(model, x0, emb, torch.ones(2, 3, dtype=torch.bool), pooled,
                                   t=torch.tensor([0.6, 0.6]), noise=eps, visual_cond=sel)
    full = seen[0]
    # Sample 0 (I2V): clean frame 0 in both noisy and condition channels, mask 1 only on frame 0.
    assert torch.allclose(full[0, 0, ..., :16], x0[0, 0]) and torch.allclose(full[0, 0, ..., 16:32], x0[0, 0])
    assert torch.allclose(full[0, 1:, ..., :16], 0.4 * x0[0, 1:] + 0.6 * eps[0, 1:], atol=1e-6)
    assert (full[0, 0, ..., 32] == 1).all() and not full[0, 1:, ..., 16:].any()
    # Sample 1 (T2V in the same batch): noisy everywhere, no condition.
    assert torch.allclose(full[1, 0, ..., :16], 0.4 * x0[1, 0] + 0.6 * eps[1, 0], atol=1e-6)
    assert not full[1, ..., 16:].any()
    # Loss: frame 0 of the I2V sample excluded.
    err = (aux["pred"] - (eps - x0)) ** 2
    expected = (err[0, 1:].sum() + err[1].sum()) / (err[0, 1:].numel() + err[1].numel())
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(aux["loss_per_sample"][0], err[0, 1:].mean(), rtol=1e-6)


def test_visual_cond_needs_a_visual_cond_model():
    model = tiny_model(visual_cond=False)
    x0 = torch.randn(1, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="visual_cond"):
        flow_matching_loss(model, x0, torch.randn(1, 3, 32), None, torch.randn(1, 32), visual_cond=True)
    loss, _ = flow_matching_loss(model, x0, torch.randn(1, 3, 32), None, torch.randn(1, 32))  # 16-channel path
    assert torch.isfinite(loss)


def test_overfit_tiny_crossdit():
    """200 AdamW steps on 4 fixed latents with fixed text, t and noise: the loss must fall at least 5x."""
    torch.manual_seed(0)
    model = CrossDiT(get_preset("tiny"))  # fresh init, zero modulations: training must move them
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 4, 4, 16, generator=g), torch.randn(4, 2, 4, 4, 16, generator=g)
    emb, pooled = torch.randn(4, 5, 32, generator=g), torch.randn(4, 32, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss, _ = flow_matching_loss(model, x0, emb, mask, pooled, t=t, noise=eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last <= first / 5, (first, last)

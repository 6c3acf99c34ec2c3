"""DRaFT-K (issue 17): gradients only through the last K steps, the KL term, and no gradient from the uncond branch.

The references are hand-written Euler loops calling the CrossDiT directly (no k5model sampling/flow-matching helpers),
so a mistake shared by the library helpers would show up here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from k5model import CrossDiT, get_preset
from k5model.flow_matching import TextCondition
from k5model.rl.draft import DraftConfig, draft_k_loss, draft_rollout
from k5model.synthetic import randomize

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 1, 4, 4, 16)  # (B, T, H, W, C) image latents
N, K, W, SHIFT = 5, 2, 4.0, 3.0


@pytest.fixture(scope="module")
def models() -> tuple[CrossDiT, CrossDiT]:
    reference = randomize(CrossDiT(get_preset("tiny_image")), std=0.1, seed=0).eval()
    policy = copy.deepcopy(reference).requires_grad_(True)
    with torch.no_grad():  # the policy has drifted from the SFT copy, so the KL term is not zero
        for p in policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    reference.requires_grad_(False)
    return policy, reference


def text(seed: int, length: int, batch: int = 2) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(batch, length, 32, generator=g, dtype=torch.float32),
                         torch.ones(batch, length, dtype=torch.bool), torch.randn(batch, 32, generator=g,
                                                                                  dtype=torch.float32))


COND, UNCOND = text(1, 5), text(2, 3)
NOISE = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float32)


def raw_v(model: CrossDiT, x: torch.Tensor, c: TextCondition, t: float) -> torch.Tensor:
    b, f, h, w, _ = x.shape
    return model(hidden_states=x, encoder_hidden_states=c.embeds, timestep=torch.full((b,), t * 1000.0),
                 pooled_projections=c.pooled, visual_rope_pos=[torch.arange(f), torch.arange(h // 2),
                                                               torch.arange(w // 2)],
                 text_rope_pos=torch.arange(c.embeds.shape[1]), scale_factor=(1.0, 2.0, 2.0)).sample


def hand_grid() -> list[float]:
    return [SHIFT * t / (1 + (SHIFT - 1) * t) for t in torch.linspace(1, 0, N + 1, dtype=torch.float32).tolist()]


def hand_rollout(policy, reference, k: int, uncond_fn=None):
    """Euler with CFG; the graph is cut at step N - k by hand; returns (x0, kl, per-step kl)."""
    g = hand_grid()
    x = NOISE.clone()
    per_step = []
    for i in range(N):
        t, dt = g[i], g[i + 1] - g[i]
        if i < N - k:
            with torch.no_grad():
                v_c = raw_v(policy, x, COND, t)
                v_u = raw_v(policy, x, UNCOND, t)
            x = (x + dt * (v_u + W * (v_c - v_u))).detach()
            continue
        v_c = raw_v(policy, x, COND, t)
        v_u = uncond_fn(i, x) if uncond_fn else raw_v(policy, x.detach(), UNCOND, t).detach()
        with torch.no_grad():
            v_ref = raw_v(reference, x, COND, t)
        per_step.append(((v_c - v_ref) ** 2).flatten(1).mean(1))
        x = x + dt * (v_u + W * (v_c - v_u))
    kl = torch.stack(per_step).sum(0).mean()
    return x, kl, per_step


def objective(x: torch.Tensor) -> torch.Tensor:
    """A fixed differentiable stand-in for 1 - R(decode(x), x_real, y)."""
    weights = torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return 1 - torch.sigmoid((x * weights).sum((1, 2, 3, 4))).mean()


def grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


def config(**kw) -> DraftConfig:
    return DraftConfig(**{"num_steps": N, "k": K, "guidance_scale": W, "shift": SHIFT, **kw})


def library_loss(policy, reference, **kw) -> torch.Tensor:
    cfg = config(**kw)
    out = draft_rollout(policy, reference, noise=NOISE, cond=COND, uncond=UNCOND, config=cfg)
    return objective(out.latents) + cfg.beta_kl * out.kl


def test_grads_equal_the_hand_truncated_graph_and_differ_from_full_backprop(models):
    policy, reference = models
    got = grads(policy, library_loss(policy, reference))
    x, kl, _ = hand_rollout(policy, reference, K)
    want = grads(policy, objective(x) + 2e-2 * kl)
    assert any(g.abs().sum() > 0 for g in got)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Deciding the other way: back-propagating through all N steps gives different gradients.
    x_full, kl_full, _ = hand_rollout(policy, reference, N)
    full = grads(policy, objective(x_full) + 2e-2 * kl_full)
    assert max((a - b).abs().max().item() for a, b in zip(got, full)) > 1e-3


def test_activation_checkpointing_and_offload_keep_the_gradients(models):
    policy, reference = models
    plain = grads(policy, library_loss(policy, reference))
    ckpt = grads(policy, library_loss(policy, reference, checkpoint_steps=True, offload_to_cpu=True))
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_kl_term_equals_the_hand_computed_sum(models):
    policy, reference = models
    out = draft_rollout(policy, reference, noise=NOISE, cond=COND, uncond=UNCOND, config=config())
    _, kl, per_step = hand_rollout(policy, reference, K)
    assert len(out.kl_per_step) == K
    for a, b in zip(out.kl_per_step, per_step, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.kl, kl, rtol=1e-5, atol=1e-8)
    assert out.kl.item() > 0
    summed = draft_rollout(policy, reference, noise=NOISE, cond=COND, uncond=UNCOND, config=config(kl_reduction="sum"))
    torch.testing.assert_close(summed.kl, kl * NOISE[0].numel(), rtol=1e-5, atol=1e-8)
    # The SFT copy itself as the policy: v_RL = v_SFT, KL exactly 0.
    same = draft_rollout(reference, reference, noise=NOISE, cond=COND, uncond=UNCOND, config=config())
    assert same.kl.item() == 0.0


def test_uncond_branch_gets_no_gradient(models):
    policy, reference = models
    seen = []  # (grad enabled, text length) of every policy forward in the grad window

    def record(module, args, kwargs, output):
        seen.append((output.sample.requires_grad, kwargs["encoder_hidden_states"].shape[1]))

    handle = policy.register_forward_hook(record, with_kwargs=True)
    try:
        loss = library_loss(policy, reference)
    finally:
        handle.remove()
    uncond_len, cond_len = UNCOND.embeds.shape[1], COND.embeds.shape[1]
    assert [g for g, n in seen if n == uncond_len] == [False] * N  # every uncond forward outside any graph
    assert [g for g, n in seen if n == cond_len] == [False] * (N - K) + [True] * K
    # Same gradients when the uncond velocities of the grad window are replaced by precomputed constants.
    g = hand_grid()
    consts = {}

    def constant_uncond(i, x):
        with torch.no_grad():
            consts[i] = raw_v(policy, x, UNCOND, g[i]).clone()
        return consts[i]

    x, kl, _ = hand_rollout(policy, reference, K, uncond_fn=constant_uncond)
    want = grads(policy, objective(x) + 2e-2 * kl)
    for a, b in zip(grads(policy, loss), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Deciding the other way: an uncond branch left in the graph changes the gradients.
    x_bad, kl_bad, _ = hand_rollout(policy, reference, K, uncond_fn=lambda i, x: raw_v(policy, x, UNCOND, g[i]))
    bad = grads(policy, objective(x_bad) + 2e-2 * kl_bad)
    assert max((a - b).abs().max().item() for a, b in zip(want, bad)) > 1e-3


def test_draft_k_loss_composes_reward_and_kl(models):
    policy, reference = models
    real = torch.zeros(SHAPE[0], 3, 8, 8, dtype=torch.float32)

    def decode(lat):
        return torch.tanh(lat[:, 0, :, :, :3].permute(0, 3, 1, 2).repeat_interleave(2, -1).repeat_interleave(2, -2))

    def reward(first, second, prompts):
        assert len(prompts) == first.shape[0] and second.shape == first.shape
        return torch.sigmoid((first - second).mean((1, 2, 3)))

    out = draft_k_loss(policy, reference, noise=NOISE, cond=COND, uncond=UNCOND, decode=decode, reward=reward,
                       real_images=real, prompts=["a", "b"], config=config())
    x, kl, _ = hand_rollout(policy, reference, K)
    r = reward(decode(x), real, ["a", "b"])
    torch.testing.assert_close(out.loss, (1 - r).mean() + 2e-2 * kl, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.reward, r.detach())
    assert out.loss.requires_grad and not out.reward.requires_grad


def test_config_refuses_bad_k():
    with pytest.raises(ValueError, match="1 <= k <= num_steps"):
        DraftConfig(num_steps=4, k=5)
    with pytest.raises(ValueError, match="1 <= k <= num_steps"):
        DraftConfig(num_steps=4, k=0)
    with pytest.raises(ValueError, match="kl_reduction"):
        DraftConfig(kl_reduction="max")
    assert DraftConfig().k == 10 and DraftConfig().beta_kl == 2e-2

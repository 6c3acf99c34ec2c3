"""Relative reward model (issue 17): torch preprocessing against the HF processor, gradients to pixels and latents
(finite differences), R = P("Yes") restricted to Yes/No, the pairwise loss, swap consistency and the KDE-σ choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from k5model.encoders.vae import ImageVAE
from k5model.rl.preprocess import VisionPreprocessConfig, preprocess_images, resized_size
from k5model.rl.reward import (
    RelativeRewardModel,
    answer_token_id,
    build_tiny_reward_model,
    chance_p_value,
    kde_density,
    kde_sigma,
    pairwise_loss,
    select_checkpoint_by_kde_sigma,
    swap_consistency,
    validation_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GREY = 1 / 255 / min(VisionPreprocessConfig().image_std)  # one grey level in normalised units (the largest one)


@pytest.fixture(scope="module")
def reward_dir(tiny_t2i_dir, tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("reward") / "vlm", tokenizer_dir=tiny_t2i_dir / "tokenizer")


@pytest.fixture(scope="module")
def reward64(reward_dir) -> RelativeRewardModel:
    return RelativeRewardModel.from_pretrained(reward_dir, dtype=torch.float64).eval()


def images(seed: int, b: int = 2, size: int = 56) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.6 - 0.8


@pytest.mark.parametrize("crop", [(slice(0, 300), slice(0, 410)), (slice(0, 504), slice(0, 504))])
def test_preprocess_matches_the_hf_processor_on_a_real_photo(crop):
    from skimage.data import astronaut
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    photo = np.ascontiguousarray(astronaut()[crop])
    hf = Qwen2VLImageProcessorPil()(images=[photo], return_tensors="pt")
    x = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    pixels, grid = preprocess_images([x], VisionPreprocessConfig(), value_range=(0.0, 1.0))
    assert grid.tolist() == hf["image_grid_thw"].tolist()
    diff = (pixels - hf["pixel_values"]).abs()
    if photo.shape[:2] == resized_size(*photo.shape[:2], VisionPreprocessConfig()):
        assert diff.max().item() < 1e-5  # no resize: identical up to float rounding
    else:
        # PIL resizes in two uint8-rounded passes, torch in float: mean within half a grey level, worst 6 levels.
        assert diff.mean().item() < 0.5 * GREY and diff.max().item() < 6 * GREY


def test_resized_size_follows_the_processor_grid_and_pixel_bounds():
    cfg = VisionPreprocessConfig()
    assert resized_size(512, 512, cfg) == (504, 504)
    assert resized_size(20, 30, cfg) == (56, 84)  # below min_pixels: scaled up
    h, w = resized_size(4000, 3000, cfg)
    assert h % 28 == w % 28 == 0 and h * w <= cfg.max_pixels
    with pytest.raises(ValueError, match="aspect ratio"):
        resized_size(10, 2100, cfg)


def test_reward_is_p_yes_restricted_to_yes_no_and_batch_independent(reward64):
    rm = reward64
    assert type(rm.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    first, second = images(0), images(1)
    prompts = ["a cat", "a red sofa in a sunny living room"]  # different lengths: right padding is exercised
    r = rm(first, second, prompts)
    assert r.shape == (2,) and ((r > 0) & (r < 1)).all()
    for i in range(2):  # the full next-token distribution of a lone sample, renormalised over {Yes, No}
        ids = torch.tensor([rm._prompt_ids(prompts[i], (4, 4))])
        pixels, grid = preprocess_images([first[i], second[i]], rm.vision)
        logits = rm.model(input_ids=ids, pixel_values=pixels.double(), image_grid_thw=grid,
                          mm_token_type_ids=(ids == rm.image_token_id).int()).logits[0, -1]
        p = torch.softmax(logits[[rm.yes_id, rm.no_id]], 0)[0]
        torch.testing.assert_close(r[i], p, rtol=1e-9, atol=1e-12)


def assert_matches_finite_differences(fn, x: torch.Tensor, grad: torch.Tensor, region: torch.Tensor,
                                      eps: float = 2e-2) -> None:
    """Central differences along two unit directions (the gradient, and the gradient on ``region`` only).

    Directional, not per element: Qwen's RMSNorm computes in fp32 even in an fp64 model, so a per-pixel step small
    enough for the truncation error drowns in fp32 rounding. At eps 2e-2 both errors are ~1e-4 relative."""
    for d in (grad, grad * region):
        u = d / d.norm()
        with torch.no_grad():
            fd = (fn(x + eps * u) - fn(x - eps * u)).item() / (2 * eps)
        assert (grad * u).sum().item() == pytest.approx(fd, rel=2e-3)


def test_pixel_gradient_is_nonzero_and_matches_finite_differences(reward64):
    first = images(2, b=1, size=60).requires_grad_(True)  # 60 px: resized to 56 on the way in
    second = images(3, b=1)

    def reward(x):
        return reward64(x, second, ["a cat"]).sum()

    (grad,) = torch.autograd.grad(reward(first), first)
    assert (grad != 0).float().mean() > 0.99  # every pixel reaches the reward
    quadrant = torch.zeros_like(grad)
    quadrant[..., :30, :30] = 1
    assert_matches_finite_differences(reward, first.detach(), grad, quadrant)


def test_gradient_reaches_the_latents_through_the_vae_decoder(reward64):
    from k5model.tiny import _vae

    torch.manual_seed(0)
    vae = ImageVAE(_vae("t2i")).to(dtype=torch.float64)
    with torch.no_grad():  # keep the random decoder's pixels inside (-1, 1): the clamp's kinks would spoil the FD
        vae.vae.decoder.conv_out.weight.mul_(0.2)
        vae.vae.decoder.conv_out.bias.mul_(0.2)
    latents = (0.3 * torch.randn(1, 1, 7, 7, 16, generator=torch.Generator().manual_seed(4),
                                 dtype=torch.float64)).requires_grad_(True)
    second = images(5, b=1)

    def reward(lat):
        return reward64(vae.decode_with_grad(lat), second, ["a dog"]).sum()

    (grad,) = torch.autograd.grad(reward(latents), latents)
    assert vae.decode(latents).abs().max() < 1
    assert (grad != 0).float().mean() > 0.99
    quadrant = torch.zeros_like(grad)
    quadrant[:, :, :3, :3] = 1
    assert_matches_finite_differences(reward, latents.detach(), grad, quadrant, eps=5e-3)


def test_pairwise_loss_is_bce_over_both_orders_and_trains(reward_dir):
    rm = RelativeRewardModel.from_pretrained(reward_dir, dtype=torch.float32).train()
    better = torch.linspace(-1, 1, 56).expand(2, 3, 56, 56).contiguous().float()  # smooth ramps
    worse = images(6).float()  # noise
    prompts = ["a cat", "a dog"]
    loss, aux = pairwise_loss(rm, better, worse, prompts)
    with torch.no_grad():
        r_fw, r_sw = rm(better, worse, prompts), rm(worse, better, prompts)
    hand = -(torch.log(r_fw).sum() + torch.log(1 - r_sw).sum()) / 4
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["score_forward"], r_fw)
    opt = torch.optim.Adam(rm.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        step_loss, _ = pairwise_loss(rm, better, worse, prompts)
        step_loss.backward()
        opt.step()
    final, aux = pairwise_loss(rm, better, worse, prompts)
    assert final.item() < 0.1 < loss.item() and aux["accuracy"].item() == 1.0
    assert swap_consistency(aux["score_forward"], aux["score_swapped"]).agreement == 1.0
    # Images of different sizes in one batch (a real photo beside a generated image) go through as a list.
    mixed, _ = pairwise_loss(rm, [better[0], better[1, :, :40, :48]], [worse[0], worse[1]], prompts)
    assert torch.isfinite(mixed)


def test_answer_token_must_be_a_single_token(reward64):
    assert answer_token_id(reward64.tokenizer, "Yes") == reward64.yes_id
    with pytest.raises(ValueError, match="single token"):
        answer_token_id(reward64.tokenizer, "Absolutely not")


def test_swap_consistency_decides_both_ways():
    consistent = swap_consistency(torch.tensor([0.9, 0.2, 0.7]), torch.tensor([0.1, 0.8, 0.3]))
    assert consistent.agreement == 1.0 and consistent.mean_abs_gap == pytest.approx(0.0, abs=1e-6)
    biased = swap_consistency(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.9, 0.1, 0.6]))  # "first wins" bias
    assert biased.agreement == pytest.approx(1 / 3) and biased.mean_abs_gap == pytest.approx((0.8 + 0.1 + 0.3) / 3)


def test_validation_metrics_of_a_good_and_a_position_biased_judge():
    good = validation_metrics(torch.tensor([0.9, 0.7, 0.6, 0.4]), torch.tensor([0.1, 0.3, 0.4, 0.6]))
    assert good["val_accuracy"] == 0.75 and good["swap_agreement"] == 1.0
    assert good["val_score_kde_sigma"] == pytest.approx(kde_sigma(torch.tensor([0.9, 0.7, 0.6, 0.4])))
    assert good["val_accuracy_swap_averaged"] == 0.75  # 0.4 vs 0.6: the one pair ranked the wrong way
    biased = validation_metrics(torch.tensor([0.9, 0.8, 0.9, 0.8]), torch.tensor([0.9, 0.8, 0.9, 0.8]))
    assert biased["val_accuracy"] == 0.5 and biased["swap_agreement"] == 0.0
    assert biased["val_accuracy_swap_averaged"] == 0.5  # identical orders: ties, no information either way


def test_swap_averaged_accuracy_sees_through_a_per_prompt_position_bias():
    """A judge that says "Yes" on prompt 1 and "No" on prompt 2 whatever the order, nudged by the images: each order
    decided against 0.5 is at chance, the swap-averaged decision ranks every pair; a judge whose nudge points the
    wrong way is ranked wrong by it (0), and the p-value tells the two from chance."""
    forward, swapped = torch.tensor([0.82, 0.83, 0.21, 0.22] * 3), torch.tensor([0.78, 0.79, 0.17, 0.18] * 3)
    right = validation_metrics(forward, swapped)
    assert right["val_accuracy"] == 0.5 and right["val_accuracy_swap_averaged"] == 1.0
    assert right["val_accuracy_swap_averaged_p"] == pytest.approx(0.5 ** 12)
    wrong = validation_metrics(swapped, forward)
    assert wrong["val_accuracy"] == 0.5 and wrong["val_accuracy_swap_averaged"] == 0.0
    assert wrong["val_accuracy_swap_averaged_p"] == 1.0
    assert chance_p_value(6, 12) == pytest.approx(sum(math.comb(12, j) for j in range(6, 13)) / 4096)


def test_kde_sigma_and_density_match_scipy():
    from scipy.stats import gaussian_kde

    scores = torch.rand(50, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kde = gaussian_kde(scores.numpy())
    grid = torch.linspace(-0.2, 1.2, 31, dtype=torch.float64)
    np.testing.assert_allclose(kde_density(scores, grid).numpy(), kde(grid.numpy()), rtol=1e-10)
    assert kde_sigma(scores) == pytest.approx(float(np.sqrt(np.var(scores.numpy(), ddof=1) + kde.covariance[0, 0])))
    assert kde_sigma(torch.full((40,), 0.99, dtype=torch.float64) + 1e-4 * scores[:40]) < 1e-3  # near-delta


def test_checkpoint_choice_is_the_largest_sigma_among_accurate_steps_not_the_last():
    steps = [100, 500, 900, 1300, 1700, 2100]
    sigmas = [0.01, 0.08, 0.15, 0.19, 0.09, 0.02]  # spread rises, then collapses to a delta
    acc = [0.55, 0.80, 0.90, 0.91, 0.92, 0.92]
    choice = select_checkpoint_by_kde_sigma(steps, sigmas, acc, accuracy_tolerance=0.02)
    assert choice.step == 1300 and "1300" in choice.reason
    # Deciding the other way: if the widest distribution is not accurate enough, it is not chosen.
    choice = select_checkpoint_by_kde_sigma(steps, sigmas, [0.55, 0.80, 0.90, 0.85, 0.92, 0.92],
                                            accuracy_tolerance=0.02)
    assert choice.step == 900  # the widest of the still-accurate ones
    with pytest.raises(ValueError, match="non-empty"):
        select_checkpoint_by_kde_sigma([], [], [], accuracy_tolerance=0.02)


def test_one_standard_error_rule_lets_no_single_pair_decide_the_checkpoint():
    """accuracy_tolerance=None: candidates are within one binomial standard error of the best accuracy. On 12
    validation pairs, 0.75 against 0.79 is half a pair (SE 0.117): both are candidates and the wider σ wins; on 400
    pairs the same gap is over one SE (0.020) and only the best is a candidate."""
    steps, sigmas, acc = [4, 8, 12, 16], [0.0024, 0.0003, 0.0007, 0.0003], [0.75, 0.125, 0.1667, 0.7917]
    small = select_checkpoint_by_kde_sigma(steps, sigmas, acc, accuracy_tolerance=None, decisions=12)
    assert small.step == 4 and "less one standard error" in small.reason and ">= 0.674" in small.reason
    large = select_checkpoint_by_kde_sigma(steps, sigmas, acc, accuracy_tolerance=None, decisions=400)
    assert large.step == 16
    assert select_checkpoint_by_kde_sigma(steps, sigmas, acc, accuracy_tolerance=0.02).step == 16  # the best only
    perfect = select_checkpoint_by_kde_sigma([1, 2], [0.2, 0.1], [0.9, 1.0], accuracy_tolerance=None, decisions=10)
    assert perfect.step == 2  # SE 0 at accuracy 1: half a decision (0.05) is the floor, and 0.9 is below it
    with pytest.raises(ValueError, match="number of validation decisions"):
        select_checkpoint_by_kde_sigma(steps, sigmas, acc, accuracy_tolerance=None)


def test_draft_k_step_end_to_end_through_vae_and_reward(tiny_t2i_dir, reward_dir):
    """DRaFT-K on the tiny pipeline's image VAE and the tiny reward VLM: the loss reaches the policy, and only it."""
    import copy

    from k5model import CrossDiT, get_preset
    from k5model.flow_matching import TextCondition
    from k5model.rl.draft import DraftConfig, draft_k_loss
    from k5model.synthetic import randomize

    reference = randomize(CrossDiT(get_preset("tiny_image")), std=0.1, seed=1).eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    vae = ImageVAE.from_pretrained(tiny_t2i_dir)
    rm = RelativeRewardModel.from_pretrained(reward_dir, dtype=torch.float32).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(8)
    cond = TextCondition(torch.randn(1, 4, 32, generator=g), torch.ones(1, 4, dtype=torch.bool),
                         torch.randn(1, 32, generator=g))
    uncond = TextCondition(torch.zeros(1, 2, 32), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 32))
    out = draft_k_loss(policy, reference, noise=torch.randn(1, 1, 4, 4, 16, generator=g), cond=cond, uncond=uncond,
                       decode=vae.decode_with_grad, reward=rm, real_images=images(9, b=1, size=32).float(),
                       prompts=["a cat"], config=DraftConfig(num_steps=3, k=1, guidance_scale=3.0))
    out.loss.backward()
    assert 0 < out.reward.item() < 1 and out.kl.item() == 0.0  # policy == SFT copy: no KL yet
    assert out.loss.item() == pytest.approx(1 - out.reward.item(), rel=1e-6)
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads) and all(torch.isfinite(gr).all() for gr in grads)
    assert all(p.grad is None for p in rm.parameters()) and all(p.grad is None for p in reference.parameters())

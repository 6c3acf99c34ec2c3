"""DRaFT-K training loop for a :class:`~k5model.rl.jobs.DraftTrainJob` (report §6.6).

The policy is the SFT pipeline's transformer (fp32 master weights, AdamW); a frozen copy of it is the KL anchor. Each
update draws ``batch`` train prompts with their real SFT images and minimises :func:`~k5model.rl.draft.draft_k_loss`
(generated image first, real image second, as in the report). Image models decode with
:meth:`ImageVAE.decode_with_grad`; a video model (the demo's SFT soup is Video Lite) generates one-frame clips whose
latent frame goes through the video VAE's decoder in the graph.

Guards against reward hacking (logged at every evaluation, on a FIXED held-out set: the val-split prompts with fixed
noise seeds): the reward against the real image, the KL to the SFT model, and simple image statistics of the samples —
mean brightness, contrast (pixel std), saturation (mean max−min over RGB) and sharpness (variance of the Laplacian) —
with their drift from step 0 (``*_drift``); a policy that games the reward by pushing saturation or high-frequency
noise shows there first. Sample grids of the held-out prompts go to ``samples/step_<N>/grid.png``.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from k5model.rl.draft import DraftConfig, draft_k_loss, draft_rollout
from k5model.rl.jobs import DraftTrainJob, load_image_tensor, read_pairs, save_image_tensor
from k5model.rl.reward import RelativeRewardModel

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
STAT_NAMES = ("img_brightness", "img_contrast", "img_saturation", "img_sharpness")


def image_statistics(images: torch.Tensor) -> dict[str, float]:
    """Reward-hacking guards of a batch (B, 3, H, W) in [-1, 1]: brightness, contrast, saturation, sharpness."""
    x = (images.detach().float().clamp(-1, 1) + 1) / 2
    grey = x.mean(1, keepdim=True)
    lap = F.conv2d(grey, LAPLACIAN.to(x)[None, None], padding=1)[..., 1:-1, 1:-1]
    return {"img_brightness": x.mean().item(), "img_contrast": x.std().item(),
            "img_saturation": (x.amax(1) - x.amin(1)).mean().item(), "img_sharpness": lap.var().item()}


def frame_decoder(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents (B, 1, h, w, C) -> pixels (B, 3, H, W) in [-1, 1] inside autograd, for the image or the video VAE."""
    if hasattr(vae, "decode_with_grad"):
        return vae.decode_with_grad

    def decode_video_frame(latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[1] != 1:
            raise ValueError(f"DRaFT on a video model generates one-frame clips, got T={latents.shape[1]}")
        z = latents.permute(0, 4, 1, 2, 3).to(vae.device, vae.dtype) / vae.scaling_factor
        return vae.vae.decode(z).sample.clamp(-1, 1)[:, :, 0].float()

    return decode_video_frame


def _grid(images: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([i.detach().cpu() for i in images], dim=2)  # side by side


def train_draft(job: DraftTrainJob, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run DRaFT-K; writes ``transformer/`` (the policy) and ``history.json`` under ``job.out``; returns the summary.
    Assembling the pipeline folder is the caller's (the same export as the stages)."""
    from k5model.pipeline import DEFAULT_VIDEO_NEGATIVE, DEFAULTS, K5Pipeline, video_scale_factor

    rows = read_pairs(job.pairs)
    items = {r["item_id"]: r for r in rows if r["first_source"] == "real" or r["second_source"] == "real"}
    real = {i: (r["first_path"] if r["first_source"] == "real" else r["second_path"]) for i, r in items.items()}
    train = sorted(i for i, r in items.items() if r["split"] == "train")
    held = sorted(i for i, r in items.items() if r["split"] == "val")
    if not train or not held:
        raise ValueError(f"{job.pairs}: need train and val items with real images, got {len(train)} and {len(held)}")
    torch.manual_seed(job.seed)
    pipe = K5Pipeline.from_pretrained(job.policy, device=job.device, dtype=torch.float32)
    policy = pipe.transformer.float().requires_grad_(True)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    reward = RelativeRewardModel.from_pretrained(job.reward_model, dtype=torch.float32, device=job.device)
    reward = reward.eval().requires_grad_(False)
    decode = frame_decoder(pipe.vae)
    _, shift, *_ = DEFAULTS[pipe.task]
    sf = video_scale_factor(job.height, job.width) if pipe.is_video else (1.0, 1.0, 1.0)
    cfg = DraftConfig(num_steps=job.num_steps, k=job.k, beta_kl=job.beta_kl, guidance_scale=job.guidance_scale,
                      shift=shift, scale_factor=sf, checkpoint_steps=job.checkpoint_steps,
                      offload_to_cpu=job.offload_to_cpu)
    neg = DEFAULT_VIDEO_NEGATIVE if pipe.is_video else ""
    with torch.no_grad():
        cond = {i: pipe.encode_text(items[i]["prompt"]) for i in train + held}
        uncond = pipe.encode_text(neg)
    s = pipe.vae.spatial_compression
    shape = (1, 1, job.height // s, job.width // s, int(policy.config.in_visual_dim))
    reals = {i: load_image_tensor(real[i])[None] for i in train + held}
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=job.lr)
    out, rng, history = Path(job.out), random.Random(job.seed), []
    gen = torch.Generator().manual_seed(job.seed)

    def one(i: str, noise: torch.Tensor):
        return draft_k_loss(policy, reference, noise=noise.to(job.device), cond=cond[i], uncond=uncond,
                            decode=decode, reward=reward, real_images=reals[i], prompts=[items[i]["prompt"]],
                            config=cfg)

    def evaluate(step: int) -> dict[str, float]:
        rewards, kls, images = [], [], []
        with torch.no_grad():
            for n, i in enumerate(held):
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + n))
                roll = draft_rollout(policy, reference, noise=noise.to(job.device), cond=cond[i], uncond=uncond,
                                     config=cfg)
                img = decode(roll.latents)
                rewards.append(reward(img, reals[i].to(img.device), [items[i]["prompt"]]).item())
                kls.append(roll.kl.item())
                images.append(img[0])
        stats = image_statistics(torch.stack(images))
        if step % job.sample_every == 0 or step == job.steps:
            save_image_tensor(_grid(images), out / "samples" / f"step_{step}" / "grid.png")
        return {"heldout_reward": sum(rewards) / len(rewards), "heldout_kl": sum(kls) / len(kls), **stats}

    first = evaluate(0)
    evals = [{"step": 0, **first}]
    for cb in callbacks:
        cb.on_step(0, dict(first))
    order: list[str] = []
    for step in range(1, job.steps + 1):
        opt.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "reward": 0.0, "kl": 0.0}
        for _ in range(job.batch):
            if not order:
                order = rng.sample(train, len(train))
            i = order.pop()
            res = one(i, torch.randn(shape, generator=gen))
            (res.loss / job.batch).backward()
            for key, v in (("loss", res.loss), ("reward", res.reward.mean()), ("kl", res.kl)):
                totals[key] += v.item() / job.batch
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), job.max_grad_norm).item()
        opt.step()
        metrics = {**totals, "kl_weighted": job.beta_kl * totals["kl"], "grad_norm": grad_norm}
        if step % job.eval_every == 0 or step == job.steps:
            e = evaluate(step)
            e.update({f"{k}_drift": e[k] - first[k] for k in STAT_NAMES})
            evals.append({"step": step, **e})
            metrics.update(e)
        history.append({"step": step, **metrics})
        for cb in callbacks:
            cb.on_step(step, metrics)
    policy.save_pretrained(out / "transformer")
    (out / "history.json").write_text(json.dumps({"train": history, "evals": evals}, indent=2))
    last = evals[-1]
    summary = {"heldout_reward_start": first["heldout_reward"], "heldout_reward_end": last["heldout_reward"],
            "heldout_kl_end": last["heldout_kl"], "max_heldout_kl": max(e["heldout_kl"] for e in evals),
            "train_items": len(train), "heldout_items": len(held), "steps": job.steps, "k": job.k,
            "num_steps": job.num_steps, "beta_kl": job.beta_kl, "transformer_dir": str(out / "transformer"),
            **{f"{k}_drift": last.get(f"{k}_drift", 0.0) for k in STAT_NAMES}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

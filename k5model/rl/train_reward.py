"""Training loop of the relative reward model (report §6.6, Figure 23) for a :class:`~k5model.rl.jobs.RewardTrainJob`.

Each step draws ``batch`` (better, worse) train pairs and minimises :func:`~k5model.rl.reward.pairwise_loss` (both
orders). Every ``eval_every`` steps (and at the last) the validation pairs are scored in both orders: validation loss
and accuracy (each order on its own, and swap-averaged: overall and per source pair), the score distribution
R(better, worse) with its Gaussian-KDE σ, swap consistency; the checkpoint is
saved as ``checkpoints/step_<N>`` and the scores with their KDE curve as ``samples/step_<N>/scores.json``. At the end
:func:`~k5model.rl.reward.select_checkpoint_by_kde_sigma` picks the checkpoint (not the last step; candidates by the
swap-averaged accuracy), copied to
``selected/``. Callbacks get ``on_step(step, metrics)`` (Pipes and MLflow reporters of the stages).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from k5model.rl.jobs import RewardTrainJob, better_worse, load_image_tensor, read_pairs
from k5model.rl.reward import (
    RelativeRewardModel,
    kde_density,
    pairwise_loss,
    select_checkpoint_by_kde_sigma,
    swap_averaged_correct,
    validation_metrics,
)


def _batch(rows: Sequence[dict[str, Any]], cache: dict[str, torch.Tensor]):
    def img(p: str) -> torch.Tensor:
        if p not in cache:
            cache[p] = load_image_tensor(p)
        return cache[p]

    return [img(r["first_path"]) for r in rows], [img(r["second_path"]) for r in rows], [r["prompt"] for r in rows]


@torch.no_grad()
def evaluate(model: RelativeRewardModel, rows: Sequence[dict[str, Any]], cache: dict[str, torch.Tensor],
             chunk: int = 8) -> dict[str, Any]:
    """Validation of (better, worse) rows in both orders: loss, accuracy, KDE σ, swap consistency, and the scores."""
    losses, fwd, swp = [], [], []
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        loss, aux = pairwise_loss(model, *_batch(part, cache))
        losses.append(loss.item() * len(part))
        fwd.append(aux["score_forward"].cpu())
        swp.append(aux["score_swapped"].cpu())
    forward, swapped = torch.cat(fwd), torch.cat(swp)
    metrics = {"val_loss": sum(losses) / len(rows), **validation_metrics(forward, swapped)}
    debiased = swap_averaged_correct(forward, swapped)
    for kind in sorted({(r["first_source"], r["second_source"]) for r in rows}):  # which comparisons are learned
        mask = torch.tensor([(r["first_source"], r["second_source"]) == kind for r in rows])
        metrics[f"val_accuracy_swap_averaged_{kind[0]}_vs_{kind[1]}"] = debiased[mask].mean().item()
    return {"metrics": metrics, "score_forward": forward.tolist(), "score_swapped": swapped.tolist()}


def _save(model: RelativeRewardModel, base: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    if (base / "preprocessor_config.json").is_file():
        shutil.copy2(base / "preprocessor_config.json", folder / "preprocessor_config.json")


def train_reward_model(job: RewardTrainJob, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train, evaluate, checkpoint, choose by σ; returns the summary (also ``out/summary.json``)."""
    rows = read_pairs(job.pairs)
    train, val = better_worse(rows, "train"), better_worse(rows, "val")
    if not train or len(val) < 2:
        raise ValueError(f"{job.pairs}: need train pairs and at least 2 validation pairs (the KDE needs 2 scores), "
                         f"got {len(train)} train and {len(val)} val; generate more reward pairs")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job.dtype]
    model = RelativeRewardModel.from_pretrained(job.base_model, dtype=dtype, device=job.device)
    model.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.lr)
    out, cache, rng = Path(job.out), {}, random.Random(job.seed)
    evals: list[dict[str, Any]] = []

    def emit(step: int, metrics: dict[str, float]) -> None:
        for cb in callbacks:
            cb.on_step(step, metrics)

    order: list[dict[str, Any]] = []
    for step in range(1, job.steps + 1):
        if len(order) < job.batch:
            order += rng.sample(train, len(train))
        part, order = order[:job.batch], order[job.batch:]
        opt.zero_grad(set_to_none=True)
        loss, aux = pairwise_loss(model, *_batch(part, cache))
        loss.backward()
        opt.step()
        metrics = {"loss": loss.item(), "train_accuracy": aux["accuracy"].item()}
        if step % job.eval_every == 0 or step == job.steps:
            model.model.eval()
            result = evaluate(model, val, cache)
            model.model.train()
            _save(model, Path(job.base_model), out / "checkpoints" / f"step_{step}")
            scores = torch.tensor(result["score_forward"], dtype=torch.float64)
            grid = torch.linspace(0, 1, 51, dtype=torch.float64)
            (out / "samples" / f"step_{step}").mkdir(parents=True, exist_ok=True)
            (out / "samples" / f"step_{step}" / "scores.json").write_text(json.dumps(
                {**result, "kde_grid": grid.tolist(), "kde_density": kde_density(scores, grid).tolist()}))
            evals.append({"step": step, **result["metrics"]})
            metrics.update(result["metrics"])
        emit(step, metrics)
    # candidates by the swap-averaged accuracy: the position-debiased decision is the one that ranks images for RL
    choice = select_checkpoint_by_kde_sigma([e["step"] for e in evals], [e["val_score_kde_sigma"] for e in evals],
                                            [e["val_accuracy_swap_averaged"] for e in evals],
                                            accuracy_tolerance=job.accuracy_tolerance,
                                            decisions=evals[0]["val_decisions"],
                                            accuracy_name="swap-averaged val accuracy")
    shutil.rmtree(out / "selected", ignore_errors=True)
    shutil.copytree(out / "checkpoints" / f"step_{choice.step}", out / "selected")
    chosen = next(e for e in evals if e["step"] == choice.step)
    summary = {"selected_step": choice.step, "selected_reason": choice.reason, "selected_dir": str(out / "selected"),
               "val_accuracy": chosen["val_accuracy"], "val_score_kde_sigma": chosen["val_score_kde_sigma"],
               **{k: v for k, v in chosen.items() if k.startswith("val_accuracy_swap_averaged")},
               "swap_agreement": chosen["swap_agreement"], "swap_mean_abs_gap": chosen["swap_mean_abs_gap"],
               "val_loss": chosen["val_loss"], "last_step_val_accuracy": evals[-1]["val_accuracy"],
               "train_pairs": len(train), "val_pairs": len(val), "chance_accuracy": 0.5, "steps": job.steps}
    (out / "evals.json").write_text(json.dumps(evals, indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

"""Relative reward model of Kandinsky 5.0 (report §6.6): a Qwen2.5-VL that sees two images and a prompt and answers
"Yes" when the first image is better; R(x₁, x₂, y) = P("Yes"), the next-token probability restricted to {Yes, No}.

Restricting to the two answer tokens makes R = sigmoid(logit_Yes − logit_No), and the training loss is the binary
cross-entropy of that logit margin: label 1 for (better, worse), 0 for the swapped pair (both orders are trained, so
the model cannot learn a position bias). The images enter through :mod:`k5model.rl.preprocess`, so R is differentiable
in the pixels of either image (DRaFT-K back-propagates through the first one).

Checkpoint choice (:func:`select_checkpoint_by_kde_sigma`): see its docstring for how we read the report's σ criterion.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from k5model.rl.preprocess import VisionPreprocessConfig, image_token_count, preprocess_images

PRODUCTION_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
Images = torch.Tensor | Sequence[torch.Tensor]  # (B, 3, H, W) or B tensors (3, H, W) of any sizes
QUESTION = ("Prompt: {prompt}\nThe first image and the second image were generated for this prompt. "
            "Is the first image better than the second one? Answer Yes or No.")
SYSTEM = "You are a strict judge of image quality and realism."


def answer_token_id(tokenizer, word: str) -> int:
    """The single token of ``word`` as an assistant answer; refuses a word that splits into several tokens."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"answer {word!r} is {len(ids)} tokens {ids} in this tokenizer; the reward needs a single "
                         "token per answer (use a Qwen2.5 tokenizer, or add the word as a token)")
    return int(ids[0])


class RelativeRewardModel(torch.nn.Module):
    """R(x₁, x₂, y) = P("Yes" | x₁, x₂, y) from a Qwen2.5-VL conditional-generation model."""

    def __init__(self, model: torch.nn.Module, tokenizer, vision: VisionPreprocessConfig | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.vision = vision or VisionPreprocessConfig(
            patch_size=model.config.vision_config.patch_size,
            merge_size=model.config.vision_config.spatial_merge_size,
            temporal_patch_size=model.config.vision_config.temporal_patch_size,
        )
        self.yes_id = answer_token_id(tokenizer, "Yes")
        self.no_id = answer_token_id(tokenizer, "No")
        self.image_token_id = int(model.config.image_token_id)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu") -> RelativeRewardModel:
        """Load a local Qwen2.5-VL folder (production: a download of ``Qwen/Qwen2.5-VL-7B-Instruct``; tests: the tiny
        folder of :func:`build_tiny_reward_model`) with its tokenizer and ``preprocessor_config.json``."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json); pass a local Qwen2.5-VL folder")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model.to(device), tokenizer, VisionPreprocessConfig.from_pretrained(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prompt_ids(self, prompt: str, tokens: tuple[int, int]) -> list[int]:
        # The Qwen chat format written out (a plain tokenizer has no chat template); images in order 1, 2.
        vision = "".join("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" for n in tokens)
        text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{vision}"
                f"{QUESTION.format(prompt=prompt)}<|im_end|>\n<|im_start|>assistant\n")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if sum(i == self.image_token_id for i in ids) != sum(tokens):
            raise ValueError(f"prompt {prompt!r} changes the number of image tokens; remove vision special tokens")
        return ids

    def logit_margin(self, first: Images, second: Images, prompts: Sequence[str]) -> torch.Tensor:
        """logit_Yes − logit_No (B,), at least fp32, for B first and B second images in [-1, 1] ((B, 3, H, W) or a
        list of (3, H, W) of any sizes, e.g. real SFT photos) and B prompts."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single str")
        b = len(prompts)
        if len(first) != b or len(second) != b:
            raise ValueError(f"{b} prompts but {len(first)} first and {len(second)} second images")
        # Per sample: image 1 then image 2, so pixel rows follow the order of the image tokens in the batch.
        images = [img for pair in zip(first, second) for img in pair]
        pixels, grid = preprocess_images(images, self.vision)
        counts = image_token_count(grid, self.vision.merge_size)
        rows = [self._prompt_ids(p, (counts[2 * i], counts[2 * i + 1])) for i, p in enumerate(prompts)]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, length), pad, dtype=torch.long)
        attn = torch.zeros((b, length), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding; the answer is read at each row's last real token
            ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
        dev = self.device
        ids, attn = ids.to(dev), attn.to(dev)
        dtype = next(self.model.parameters()).dtype
        out = self.model.model(
            input_ids=ids, attention_mask=attn, pixel_values=pixels.to(dev, dtype), image_grid_thw=grid.to(dev),
            mm_token_type_ids=(ids == self.image_token_id).int(), use_cache=False,
        )
        last = out.last_hidden_state[torch.arange(b, device=dev), attn.sum(1) - 1]
        # Only the two answer rows of the LM head: the full 152k-vocab logits are never needed.
        head = self.model.lm_head.weight[[self.yes_id, self.no_id]]
        logits = last @ head.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 weights: fp32 margin
        return logits[:, 0] - logits[:, 1]

    def forward(self, first: Images, second: Images, prompts: Sequence[str]) -> torch.Tensor:
        """R(x₁, x₂, y) = P("Yes") restricted to {Yes, No}, (B,) in (0, 1)."""
        return torch.sigmoid(self.logit_margin(first, second, prompts))


def pairwise_loss(model: RelativeRewardModel, better: Images, worse: Images,
                  prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCE on P("Yes") over both orders: (better, worse) → 1 and (worse, better) → 0. Returns (loss, aux) with the
    detached scores of both orders and the accuracy over both."""
    prompts = list(prompts)
    better, worse = list(better), list(worse)
    margin = model.logit_margin(better + worse, worse + better, prompts + prompts)
    b = len(better)
    labels = torch.cat([torch.ones(b), torch.zeros(b)]).to(margin.device)
    loss = F.binary_cross_entropy_with_logits(margin, labels)
    scores = torch.sigmoid(margin.detach())
    aux = {"score_forward": scores[:b], "score_swapped": scores[b:],
           "accuracy": ((scores > 0.5).float() == labels).float().mean()}
    return loss, aux


@dataclass(frozen=True)
class SwapConsistency:
    """How well R(a, b) and R(b, a) agree with each other."""

    agreement: float
    """Fraction of pairs whose two orders give opposite decisions (R(a,b) > 0.5 exactly when R(b,a) < 0.5)."""
    mean_abs_gap: float
    """Mean |R(a, b) + R(b, a) − 1|: 0 for a perfectly order-symmetric judge."""


def swap_consistency(score_forward: torch.Tensor, score_swapped: torch.Tensor) -> SwapConsistency:
    """Swap-order consistency of scores of the same pairs in both orders (equal shapes, values in [0, 1])."""
    if score_forward.shape != score_swapped.shape or score_forward.numel() == 0:
        raise ValueError(f"need two equal, non-empty score tensors, got {tuple(score_forward.shape)} and "
                         f"{tuple(score_swapped.shape)}")
    f, s = score_forward.double(), score_swapped.double()
    agree = ((f > 0.5) != (s > 0.5)).double().mean().item()
    return SwapConsistency(agreement=agree, mean_abs_gap=(f + s - 1).abs().mean().item())


def swap_averaged_correct(score_forward: torch.Tensor, score_swapped: torch.Tensor) -> torch.Tensor:
    """Per pair, 1 when the position-debiased score ½(R(b, w) + 1 − R(w, b)) prefers the better image (R(b, w) >
    R(w, b)), ½ on a tie, else 0. A pairwise VLM judge's P("Yes") carries a per-prompt position bias; scoring both
    orders and averaging cancels it, which is how pairwise judges are evaluated. DRaFT-K keeps the real image in slot
    2, so such a bias is a constant offset per prompt there and does not steer the policy: this decision is the one
    that ranks images for RL."""
    f, s = score_forward.double(), score_swapped.double()
    return (f > s).double() + 0.5 * (f == s).double()


def chance_p_value(correct: float, n: int) -> float:
    """One-sided exact binomial p-value of at least ``correct`` (rounded) successes in ``n`` fair coin flips."""
    k = round(correct)
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2 ** n if n else 1.0


def validation_metrics(score_forward: torch.Tensor, score_swapped: torch.Tensor) -> dict[str, float]:
    """What an evaluation step logs, from the scores of the validation pairs in both orders: accuracy over both
    orders (each order decided on its own, against 0.5), the swap-averaged accuracy (:func:`swap_averaged_correct`,
    the checkpoint criterion's accuracy) with its binomial p-value against chance, the KDE σ of the
    (better, worse)-order scores and swap consistency."""
    consistency = swap_consistency(score_forward, score_swapped)
    correct = torch.cat([score_forward > 0.5, score_swapped < 0.5]).double()
    debiased = swap_averaged_correct(score_forward, score_swapped)
    return {"val_accuracy": correct.mean().item(), "val_accuracy_swap_averaged": debiased.mean().item(),
            "val_accuracy_swap_averaged_p": chance_p_value(debiased.sum().item(), debiased.numel()),
            "val_decisions": debiased.numel(),
            "val_score_kde_sigma": kde_sigma(score_forward),
            "val_score_mean": score_forward.double().mean().item(), "swap_agreement": consistency.agreement,
            "swap_mean_abs_gap": consistency.mean_abs_gap}


def kde_bandwidth(scores: torch.Tensor) -> float:
    """Scott's-rule bandwidth of a 1-d Gaussian KDE (scipy's default): std(ddof=1) · n^(−1/5)."""
    x = scores.double().flatten()
    if x.numel() < 2:
        raise ValueError(f"a KDE needs at least 2 scores, got {x.numel()}")
    return x.std(unbiased=True).item() * x.numel() ** (-0.2)


def kde_sigma(scores: torch.Tensor) -> float:
    """σ of the validation scores' Gaussian KDE: the standard deviation of the estimated density, sqrt(var + h²) with
    h the Scott bandwidth. It goes to 0 as the scores collapse to a delta function (the report's overfitting sign)."""
    x = scores.double().flatten()
    h = kde_bandwidth(x)
    return math.sqrt(x.var(unbiased=True).item() + h * h)


def kde_density(scores: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The Gaussian KDE (Scott bandwidth) of ``scores`` evaluated on ``grid``: the curve of the report's Figure 23."""
    x = scores.double().flatten()
    h = max(kde_bandwidth(x), 1e-12)
    z = (grid.double()[:, None] - x[None]) / h
    return torch.exp(-0.5 * z * z).mean(1) / (h * math.sqrt(2 * math.pi))


@dataclass(frozen=True)
class CheckpointChoice:
    """The evaluation step chosen by the σ criterion and why."""

    step: int
    sigma: float
    accuracy: float
    reason: str


def select_checkpoint_by_kde_sigma(
    steps: Sequence[int], sigmas: Sequence[float], accuracies: Sequence[float], *,
    accuracy_tolerance: float | None = None, decisions: int | None = None, accuracy_name: str = "val accuracy",
) -> CheckpointChoice:
    """Choose the reward checkpoint by the KDE σ of its validation scores (report §6.6, Figure 23).

    How we read the report: the validation scores are R(x_better, x_worse, y) for every validation pair in the
    (better, worse) order. Untrained, they sit in a narrow bump near 0.5; as the model learns they spread towards 1
    (a graded reward); overfitting makes them pile up into a delta function (a saturated reward whose gradient
    vanishes, useless for DRaFT). σ (:func:`kde_sigma`) therefore rises and then falls. Among the evaluation steps
    whose validation accuracy is within ``accuracy_tolerance`` of the best one, we take the step with the largest σ
    (the earliest on ties) — the most discriminative checkpoint before the collapse, not the last step.
    ``accuracy_tolerance=None`` takes one binomial standard error of the best accuracy a over the ``decisions``
    validation decisions, sqrt(a(1 − a)/n), at least half a decision (the one-standard-error rule of model
    selection): on a small validation set one pair more or less must not decide which checkpoint is "accurate".
    ``accuracy_name`` names the accuracy passed in the recorded reason.
    """
    if not (len(steps) == len(sigmas) == len(accuracies)) or not steps:
        raise ValueError(f"need equal, non-empty steps/sigmas/accuracies, got {len(steps)}/{len(sigmas)}/"
                         f"{len(accuracies)}")
    best_acc, rule = max(accuracies), ""
    if accuracy_tolerance is None:
        rule = ", less one standard error"
        if not decisions or decisions < 1:
            raise ValueError("accuracy_tolerance=None (one standard error) needs the number of validation decisions")
        accuracy_tolerance = max(math.sqrt(best_acc * (1.0 - best_acc) / decisions), 0.5 / decisions)
    eligible = [i for i, a in enumerate(accuracies) if a >= best_acc - accuracy_tolerance - 1e-12]
    i = max(eligible, key=lambda j: (sigmas[j], -steps[j]))
    reason = (f"step {steps[i]}: largest KDE σ {sigmas[i]:.4f} among {len(eligible)} of {len(steps)} evaluations "
              f"with {accuracy_name} >= {best_acc - accuracy_tolerance:.3f} (best {best_acc:.3f}{rule})")
    return CheckpointChoice(step=int(steps[i]), sigma=float(sigmas[i]), accuracy=float(accuracies[i]), reason=reason)


def build_tiny_reward_model(out_dir: str | os.PathLike, *, seed: int = 0,
                            tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """A tiny random Qwen2.5-VL reward folder (same class as the 7B) whose tokenizer has single "Yes"/"No" tokens.

    Uses the tiny pipeline's Qwen builders; "Yes" and "No" are added as tokens because the tiny BPE never saw them.
    ``tokenizer_dir``: start from a tiny pipeline's ``tokenizer/`` instead of training the BPE again (~15 s on CPU).
    A folder that already holds a model is returned as is; loading goes through
    :meth:`RelativeRewardModel.from_pretrained`."""
    from transformers import AutoTokenizer

    from k5model.tiny import _qwen_model, _qwen_tokenizer

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    else:
        tokenizer = _qwen_tokenizer()
    tokenizer.add_tokens(["Yes", "No"])
    model = _qwen_model(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out

"""The one batch type the trainer consumes.

Every data source (the latent shards of ``k5data.loading.training_source``; the synthetic source kept for tests and
benchmarks) yields a ``PackedBatch``: N latents of possibly different shapes that ``CrossDiT.forward_packed`` runs as
one sequence (report §6.1.2). Conditions of ``visual_cond`` models are 16 condition channels + 1 mask per latent voxel,
built only by ``k5model.flow_matching.condition_channels`` so the shard source, the synthetic source and the loss
agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from k5model.flow_matching import TASK_KINDS, condition_channels

__all__ = ["TASK_KINDS", "PackedBatch", "clean_frames_of", "condition_channels", "pack"]


def clean_frames_of(task: str) -> int:
    """Leading latent frames given clean to the model and left out of the loss (the I2V first frame)."""
    return 1 if task == "i2v" else 0


@dataclass
class PackedBatch:
    """N training samples for one ``flow_matching_loss_packed`` call.

    ``x0``: N clean latents (T_i, H_i, W_i, C); ``text_embeds``: N (L_i, D) real text tokens (no padding);
    ``pooled``: (N, D_pool); ``tasks``: per sample one of ``TASK_KINDS``; ``condition``: per sample the
    ``condition_channels`` (None for models without visual-condition channels); ``clean_frames``: per sample, see
    ``clean_frames_of``; ``ids``: sample ids when the source has them."""

    x0: list[torch.Tensor]
    text_embeds: list[torch.Tensor]
    pooled: torch.Tensor
    tasks: list[str]
    condition: list[torch.Tensor] | None = None
    clean_frames: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.x0)
        if n == 0 or len(self.text_embeds) != n or self.pooled.shape[0] != n or len(self.tasks) != n:
            raise ValueError(f"packed batch sizes disagree: {n} latents, {len(self.text_embeds)} texts, "
                             f"{self.pooled.shape[0]} pooled vectors, {len(self.tasks)} tasks")
        if not self.clean_frames:
            self.clean_frames = [clean_frames_of(t) for t in self.tasks]

    @property
    def is_image(self) -> bool:
        return all(x.shape[0] == 1 for x in self.x0)

    def __len__(self) -> int:
        return len(self.x0)


def pack(x0: Sequence[torch.Tensor], text_embeds: Sequence[torch.Tensor], pooled: torch.Tensor, tasks: Sequence[str],
         *, visual_cond: bool, sources: Sequence[torch.Tensor | None] | None = None,
         ids: Sequence[str] = ()) -> PackedBatch:
    """A ``PackedBatch`` with its condition channels built from the tasks (``sources``: edit samples' source
    latents)."""
    sources = list(sources) if sources is not None else [None] * len(x0)
    condition = ([condition_channels(x, t, s) for x, t, s in zip(x0, tasks, sources)] if visual_cond else None)
    if not visual_cond and any(t in ("i2v", "edit") for t in tasks):
        raise ValueError(f"tasks {sorted(set(tasks))} need a model with visual-condition channels")
    return PackedBatch(list(x0), list(text_embeds), pooled, list(tasks), condition, ids=list(ids))

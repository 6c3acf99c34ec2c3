"""Training batches from latent shards (report §6.1.2): the packed aspect-ratio loader, text embeddings computed on the
fly (§6.1.1), a task drawn per sample, and the matching condition channels.

``ShardLatentSource`` is a trainer data source (``k5model.training.trainer.Trainer``): each item is a
``k5model.training.batch.PackedBatch`` (N latents of their own shapes, real Qwen tokens only, CLIP pooled vectors,
per-sample tasks and condition channels) that ``Trainer.train_step`` sends through ``CrossDiT.forward_packed``.

Tasks per sample, with the stage's probabilities (``StageConfig.tasks``): image-only batches (a fraction
``p(t2i) + p(edit)`` of the steps, report: images only in image-only batches) train instruct editing on samples that
carry a ``source_latent`` with probability ``p(edit) / (p(edit) + p(t2i))`` (the Image Editing stages: 80 %), else
T2I (an editing pair's target then trains with its own description, ``t2i_caption``); every video sample is I2V with
probability ``p(i2v) / (p(t2v) + p(i2v))``, else T2V. Condition channels (``visual_cond`` models: 16 condition + 1
mask): built by ``k5model.training.batch.condition_channels``. Each task uses its own Qwen template (video / i2v /
image / edit; an edit prompt also shows Qwen the source image stored with the pair). ``res_classes`` limits the
archives read to a stage's resolution classes (its Table 4 row).

Draws depend only on (seed, rank, batch index) and the loaders' states, so ``state_dict`` / ``load_state_dict``
resume exactly. Images and videos stream from two loaders, each cycling through its own epochs, so the image-step
fraction holds whatever the data mix. Ranks read disjoint archives (round-robin over a per-epoch shuffle shared by
all ranks); when a rank's archives of a modality are exhausted, that stream starts a new epoch with a new shuffle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from k5data.latents.shards import Store, read_index
from k5data.loading.loader import ArchivePrefetcher, PackedLatentLoader, PackedSamples
from k5model.flow_matching import TextCondition
from k5model.training.batch import PackedBatch, pack
from k5model.training.caption_variants import pick_captions
from k5model.training.config import StageConfig

log = logging.getLogger(__name__)
TEMPLATE = {"t2v": "video", "i2v": "i2v", "t2i": "image", "edit": "edit"}  # Qwen prompt template of each task


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)


class TextEncoders:
    """Qwen2.5-VL (template hidden states, real tokens only) + CLIP pooled, as the report computes them on the fly."""

    def __init__(self, qwen: Any, clip: Any):
        self.qwen, self.clip = qwen, clip

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> TextEncoders:
        """From a pipeline folder (``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/``)."""
        from k5model.encoders.text import ClipTextEncoder, QwenTextEncoder

        return cls(QwenTextEncoder.from_pretrained(path, device=device, dtype=dtype),
                   ClipTextEncoder.from_pretrained(path, device=device, dtype=dtype))

    @property
    def text_dim(self) -> int:
        return self.qwen.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.clip.hidden_size

    def encode(self, captions: Sequence[str], tasks: Sequence[str],
               images: Sequence[np.ndarray | None] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per caption its Qwen states (L_i, D) in its task's template (padding removed) and the CLIP pooled
        vectors (N, D_pool), fp32. ``images``: per caption the edit source image Qwen sees (edit tasks only)."""
        if len(captions) != len(tasks):
            raise ValueError(f"{len(captions)} captions but {len(tasks)} tasks")
        embeds: list[torch.Tensor | None] = [None] * len(captions)
        for template in sorted({TEMPLATE[t] for t in tasks}):
            rows = [i for i, t in enumerate(tasks) if TEMPLATE[t] == template]
            shown = [images[i] for i in rows] if images is not None and template == "edit" else None
            enc = self.qwen.encode([captions[i] for i in rows], task=template,
                                   images=shown if shown and any(im is not None for im in shown) else None)
            for j, i in enumerate(rows):
                embeds[i] = enc.embeds[j][enc.mask[j]].float()
        pooled = self.clip.encode(list(captions)).float()
        return embeds, pooled  # type: ignore[return-value]

    def null_condition(self, task: str = "t2v") -> TextCondition:
        """The empty prompt (CFG dropout target), batch 1 with a full mask."""
        (embeds,), pooled = self.encode([""], [task])
        return TextCondition(embeds[None], torch.ones(1, embeds.shape[0], dtype=torch.bool), pooled)


class _Stream:
    """Endless packed batches of one modality: a PackedLatentLoader per epoch over this rank's archives."""

    def __init__(self, src: ShardLatentSource, modality: str):
        self.src, self.modality = src, modality
        self.epoch, self.batches = 0, 0  # batches taken in the current epoch
        # one worker per stream, kept across epochs (each epoch's loader restarts it on its own archive list)
        self.prefetcher = ArchivePrefetcher(src.store, src.prefetch) if src.prefetch > 0 else None
        self.loader = self._loader()

    def _loader(self) -> PackedLatentLoader:
        src, salt = self.src, ("image", "video").index(self.modality)
        # one shuffle of the archives per epoch, the same on every rank, then a round-robin split: disjoint archives
        return PackedLatentLoader(src.store, src.prefix, src.t_max, float(self.modality == "image"),
                                  seed=_seed(src.stage.seed, src.rank, self.epoch, salt), queue_factor=src.queue_factor,
                                  rank=src.rank, world_size=src.world_size, modalities=(self.modality,),
                                  shuffle_seed=_seed(src.stage.seed, self.epoch, salt, 7),
                                  res_classes=src.res_classes, prefetcher=self.prefetcher)

    def next(self) -> PackedSamples:
        while True:
            try:
                batch = next(self.loader)
            except StopIteration:
                if self.batches == 0:
                    src = self.src
                    raise RuntimeError(
                        f"rank {src.rank} of {src.world_size} has no {self.modality} archives under {src.prefix!r} "
                        "(fewer archives than ranks): write smaller shards or use fewer ranks") from None
                self.epoch, self.batches = self.epoch + 1, 0
                self.loader = self._loader()
                continue
            self.batches += 1
            return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.loader = self._loader()
        self.loader.load_state_dict(state["loader"])


class ShardLatentSource(Iterator[PackedBatch]):
    """Endless packed training batches streamed from the shards under ``prefix`` (module docstring).

    ``t_max``: latent frames per batch (default ``stage.batch * stage.frames``). ``image_step_fraction``: share of
    image-only steps, drawn per step (default the stage's p(t2i); 0 or 1 when the shards or the stage hold one
    modality only). Images and videos stream from two loaders that cycle through their epochs independently.
    ``prefetch``: samples each stream reads ahead in a worker process (``ArchivePrefetcher``: object-store reads and
    tar unpacking overlap the training step; the state still records only what the batches took); 0 = inline."""

    def __init__(self, store: Store, prefix: str, stage: StageConfig, text: TextEncoders, *,
                 t_max: int | None = None, rank: int = 0, world_size: int = 1,
                 image_step_fraction: float | None = None, edit_prob: float | None = None, visual_cond: bool = True,
                 queue_factor: float = 2.0, device: torch.device | str = "cpu", res_classes: Sequence[str] = (),
                 prefetch: int = 0):
        self.store, self.prefix, self.stage, self.text = store, prefix.strip("/"), stage, text
        self.rank, self.world_size, self.visual_cond = rank, world_size, visual_cond
        self.queue_factor, self.device = queue_factor, torch.device(device)
        self.res_classes = tuple(res_classes)
        self.prefetch = int(prefetch)
        self.t_max = int(t_max or stage.batch * stage.frames)
        if self.t_max < 1:
            raise ValueError(f"t_max must be >= 1, got {self.t_max}")
        tasks = stage.tasks
        self.p_i2v = tasks.get("i2v", 0.0) / max(tasks.get("t2v", 0.0) + tasks.get("i2v", 0.0), 1e-12)
        p_image = tasks.get("t2i", 0.0) + tasks.get("edit", 0.0)
        if edit_prob is None:  # the stage's share of editing among its image samples (Image Editing: 0.8)
            edit_prob = tasks.get("edit", 0.0) / p_image if p_image > 0 else 0.0
        self.edit_prob = float(edit_prob)
        for task in ("i2v", "edit"):
            if tasks.get(task, 0.0) > 0 and not visual_cond:
                raise ValueError(f"stage {stage.name!r} trains {task}, which needs a model with visual_cond channels")
        index = read_index(store, self.prefix)
        if index.num_rows == 0:
            raise ValueError(f"no latent shards listed under {self.prefix!r} (missing {self.prefix}/index.parquet?)")
        classes = index.column("res_class").to_pylist()
        present = {m for m, c in zip(index.column("modality").to_pylist(), classes)
                   if not self.res_classes or c in self.res_classes}
        wanted = {m for m, p in (("image", p_image),
                                 ("video", tasks.get("t2v", 0.0) + tasks.get("i2v", 0.0))) if p > 0}
        self.modalities = tuple(sorted(present & wanted))
        if not self.modalities:
            where = f" of classes {list(self.res_classes)}" if self.res_classes else ""
            raise ValueError(f"stage {stage.name!r} trains {sorted(wanted)} samples but the shards under "
                             f"{self.prefix!r}{where} hold only {sorted(present) or 'none'}")
        if len(self.modalities) == 1:
            image_step_fraction = float(self.modalities == ("image",))
        elif image_step_fraction is None:
            image_step_fraction = p_image
        if not 0.0 <= image_step_fraction <= 1.0:
            raise ValueError(f"image_step_fraction must be in [0, 1], got {image_step_fraction}")
        self.image_step_fraction = float(image_step_fraction)
        self.index = 0
        self.streams = {m: _Stream(self, m) for m in self.modalities}

    def __iter__(self) -> ShardLatentSource:
        return self

    def __next__(self) -> PackedBatch:
        g = torch.Generator().manual_seed(_seed(self.stage.seed, self.rank, self.index, 2))
        self.index += 1
        image_step = float(torch.rand(1, generator=g)) < self.image_step_fraction
        pb = self.streams["image" if image_step else "video"].next()
        n = len(pb.latents)
        draws = torch.rand(n, generator=g).tolist()
        sources = pb.source_latents or [None] * n
        if pb.is_image:
            tasks = ["edit" if src is not None and self.visual_cond and u < self.edit_prob else "t2i"
                     for u, src in zip(draws, sources)]
            if self.edit_prob > 0 and not any(s is not None for s in sources) and self.index == 1:
                log.warning("stage %s trains edit but the first image batch under %r holds no editing pairs "
                            "(source latents); they train t2i", self.stage.name, self.prefix)
        else:
            tasks = ["i2v" if u < self.p_i2v else "t2v" for u in draws]
        x0 = [torch.from_numpy(np.asarray(lat, dtype=np.float32)).to(self.device) for lat in pb.latents]
        edit_sources = [torch.from_numpy(np.asarray(src, dtype=np.float32)) if t == "edit" else None
                        for t, src in zip(tasks, sources)]
        # SFT shards carry caption variants: one per sample and step, from a generator of its own
        captions = pick_captions(pb.captions, torch.Generator().manual_seed(_seed(self.stage.seed, self.rank,
                                                                                  self.index - 1, 3)))
        # an editing pair drawn as t2i trains its target with the target's own description, not the instruction
        t2i_captions = pb.t2i_captions or [None] * n
        captions = [c if t == "edit" or src is None or not own else own
                    for c, t, src, own in zip(captions, tasks, sources, t2i_captions)]
        images = [im if t == "edit" else None for t, im in zip(tasks, pb.source_images or [None] * n)]
        embeds, pooled = self.text.encode(captions, tasks, images)
        return pack(x0, embeds, pooled, tasks, visual_cond=self.visual_cond, sources=edit_sources, ids=pb.ids)

    def close(self) -> None:
        """Stop the prefetch workers (they also exit with this process)."""
        for stream in self.streams.values():
            if stream.prefetcher is not None:
                stream.prefetcher.close()

    def null_condition(self) -> TextCondition:
        return self.text.null_condition("t2i" if self.modalities == ("image",) else "t2v")

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "streams": {m: st.state_dict() for m, st in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["streams"]) != set(self.streams):
            raise ValueError(f"data state holds streams {sorted(state['streams'])}, this source has "
                             f"{sorted(self.streams)} (other shards or stage task mix?)")
        self.index = int(state["index"])
        for m, st in self.streams.items():
            st.load_state_dict(state["streams"][m])

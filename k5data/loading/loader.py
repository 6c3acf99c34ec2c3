"""Streaming packed-latent loader (report 6.1.2) with exact resume.

Resume semantics: state = (shard cursor, number of samples consumed from the current archive,
per-aspect-ratio queue contents as sample ids, rng state, batch counter). On load the loader re-reads the
archives that still hold queued samples plus the current one, skipping consumed samples, so restarting from a
state_dict yields exactly the batches the uninterrupted run would have produced.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from k5data.latents.shards import LatentSample, Store, read_index, read_tar


@dataclass
class PackedSamples:
    """Raw samples of one packed batch, as read from the archives (the trainer's ``PackedSamples`` is built from it by
    ``k5data.loading.training_source``)."""

    latents: list[np.ndarray]  # each (T, H, W, 16), for CrossDiT.forward_packed
    ids: list[str]
    captions: list[str]
    fps: list[float]
    is_image: bool
    source_latents: list[np.ndarray | None] = field(default_factory=list)  # editing sources (None: not a pair)


class PackedLatentLoader:
    def __init__(self, store: Store, prefix: str, t_max: int, image_step_fraction: float, seed: int,
                 queue_factor: float = 2.0, *, rank: int = 0, world_size: int = 1,
                 modalities: tuple[str, ...] | None = None, shuffle_seed: int | None = None,
                 res_classes: tuple[str, ...] = ()) -> None:
        """``rank``/``world_size``: this rank streams every world_size-th archive (disjoint archives per rank).
        ``modalities``: only archives of these ("image", "video"); None = all. ``shuffle_seed``: archive order
        shuffled with it before the rank split (use the same seed on every rank); None = sorted order.
        ``res_classes``: only archives of these resolution classes (low, medium, high); empty = all."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.store, self.prefix, self.t_max = store, prefix, t_max
        self.frac, self.seed = image_step_fraction, seed
        self.queue_factor = queue_factor  # why: a queue holding >= factor*t_max frames lets first-fit fill batches
        idx = read_index(store, prefix)
        shards = idx.column("shard").to_pylist()
        classes = idx.column("res_class").to_pylist()
        keep = {sh for sh, mod, cls in zip(shards, idx.column("modality").to_pylist(), classes)
                if (modalities is None or mod in modalities) and (not res_classes or cls in res_classes)}
        order = sorted(keep)  # deterministic archive order, optionally shuffled, split round-robin over ranks
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        self.shards = order[rank::world_size]
        self.shard_of = dict(zip(idx.column("sample_id").to_pylist(), shards))
        self.rng = random.Random(seed)
        self.cursor = 0  # next archive to open
        self.queues: dict[tuple[bool, int, int], list[LatentSample]] = {}
        self._it: Iterator[LatentSample] | None = None
        self._consumed = 0  # samples taken from the currently open archive

    @staticmethod
    def _key(s: LatentSample) -> tuple[bool, int, int]:
        # why: queues keyed by (is_image, H, W) so images never mix with videos and one aspect ratio per batch
        return (s.latent.shape[0] == 1, s.latent.shape[1], s.latent.shape[2])

    def _pull(self) -> bool:
        """Move one sample from the archive stream into its queue; False when the dataset is exhausted."""
        while True:
            if self._it is None:
                if self.cursor >= len(self.shards):
                    return False
                self._it = read_tar(self.store.open_read(f"{self.prefix}/{self.shards[self.cursor]}"))
                self.cursor += 1
                self._consumed = 0
            s = next(self._it, None)
            if s is None:
                self._it = None
                continue
            self._consumed += 1
            self.queues.setdefault(self._key(s), []).append(s)
            return True

    def _ready(self, want_image: bool) -> list[tuple[bool, int, int]]:
        return sorted(k for k, q in self.queues.items()
                      if k[0] == want_image and sum(s.latent.shape[0] for s in q) >= self.queue_factor * self.t_max)

    def __iter__(self) -> PackedLatentLoader:
        return self

    def __next__(self) -> PackedSamples:
        want_image = self.rng.random() < self.frac
        while not self._ready(want_image):
            if not self._pull():
                # end of data: flush leftovers (any modality) so no sample is lost
                left = sorted(k for k, q in self.queues.items() if q)
                if not left:
                    raise StopIteration
                return self._pop(left[0])
        return self._pop(self._ready(want_image)[0])

    def _pop(self, key: tuple[bool, int, int]) -> PackedSamples:
        # first-fit in FIFO order: oldest sample always goes first (no starvation), later ones fill the gaps
        q = self.queues[key]
        out, total, rest = [q[0]], q[0].latent.shape[0], []
        for s in q[1:]:
            if total + s.latent.shape[0] <= self.t_max:
                out.append(s)
                total += s.latent.shape[0]
            else:
                rest.append(s)
        self.queues[key] = rest
        return PackedSamples([s.latent for s in out], [s.id for s in out], [s.caption for s in out],
                           [s.fps for s in out], key[0], [s.source_latent for s in out])

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "open": self._it is not None, "consumed": self._consumed,
                "queues": [[list(k), [s.id for s in q]] for k, q in self.queues.items()],
                "rng": self.rng.getstate()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.rng.setstate(_tuplify(st["rng"]))
        want = {sid for _, ids in st["queues"] for sid in ids}
        found: dict[str, LatentSample] = {}
        for shard in sorted({self.shard_of[s] for s in want}):  # re-read archives still holding queued samples
            for s in read_tar(self.store.open_read(f"{self.prefix}/{shard}")):
                if s.id in want:
                    found[s.id] = s
        self.queues = {tuple(k): [found[i] for i in ids] for k, ids in st["queues"]}  # type: ignore[misc]
        self.cursor, self._it, self._consumed = st["cursor"], None, 0
        if st["open"]:  # re-open the current archive and skip what was already consumed
            self.cursor -= 1
            self._pull_open()
            for _ in range(st["consumed"]):
                next(self._it)  # type: ignore[arg-type]
            self._consumed = st["consumed"]

    def _pull_open(self) -> None:
        self._it = read_tar(self.store.open_read(f"{self.prefix}/{self.shards[self.cursor]}"))
        self.cursor += 1


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x

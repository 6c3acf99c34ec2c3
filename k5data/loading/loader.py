"""Streaming packed-latent loader (report 6.1.2) with exact resume.

Resume semantics: state = (shard cursor, number of samples consumed from the current archive,
per-aspect-ratio queue contents as sample ids, rng state, batch counter). On load the loader re-reads the
archives that still hold queued samples plus the current one, skipping consumed samples, so restarting from a
state_dict yields exactly the batches the uninterrupted run would have produced.

Overlapped I/O: with an ``ArchivePrefetcher`` the archives are read from the object store and unpacked in a worker
process, up to ``depth`` samples ahead, in a bounded queue; the loader takes samples from it in the same order it
would have read them itself. Its state counts only the samples the loader took (what the trainer's batches hold or
its queues wait on), never what the worker read ahead, so resume stays exact; after a load the worker restarts at the
recorded archive and sample.
"""
from __future__ import annotations

import os
import queue
import random
import traceback
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
    source_images: list[np.ndarray | None] = field(default_factory=list)  # the sources as Qwen sees them
    t2i_captions: list[str | None] = field(default_factory=list)  # editing pairs: the target's own description


def _store_recipe(store: Store) -> tuple[str, ...] | Store:
    """What a worker process rebuilds the store from: S3 clients do not pickle, so an S3 store travels as its
    location; anything else as itself."""
    from k5data.object_store import S3Store

    if isinstance(store, S3Store):
        return ("s3", store.location, store.endpoint_url or "", store.region)
    return store


def _prefetch_worker(recipe: Any, requests: Any, out: Any, generation: Any, parent: int) -> None:
    """Worker process: for each request (generation, prefix, archives, first, skip) stream archives[first:] (the first
    one without its ``skip`` leading samples) into ``out`` as (generation, archive index, sample), then
    (generation, index, None) after each archive and (generation, None, None) at the end. A newer generation
    abandons the current request; the worker exits when asked (None) or when its parent is gone."""
    import signal

    from k5data.object_store import open_store

    # why: a spawned child inherits ignored signals; with SIGTERM ignored the parent's terminate() (and Python's own
    # exit-time clean-up of daemon children) would wait on this worker forever
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out.cancel_join_thread()  # samples still buffered for a parent that stopped reading are dropped at exit
    store = open_store(recipe[1], recipe[2] or None, region=recipe[3]) if isinstance(recipe, tuple) else recipe

    def alive() -> bool:
        return os.getppid() == parent

    def put(item: tuple[Any, ...]) -> bool:
        while generation.value == item[0] and alive():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False  # superseded by a newer request, or orphaned

    while alive():
        try:
            request = requests.get(timeout=0.5)
        except queue.Empty:
            continue
        if request is None:
            return
        gen, prefix, archives, first, skip = request
        try:
            for i in range(first, len(archives)):
                for j, sample in enumerate(read_tar(store.open_read(f"{prefix}/{archives[i]}"))):
                    if (i > first or j >= skip) and not put((gen, i, sample)):
                        break
                else:
                    if put((gen, i, None)):
                        continue
                break
            else:
                put((gen, None, None))
        except Exception as exc:  # reported to the loader, which raises it in the training process
            put((gen, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))


class ArchivePrefetcher:
    """A worker process that reads and unpacks a loader's archives ahead of it, at most ``depth`` samples ahead
    (a bounded queue: memory stays ``depth`` samples whatever the archive size). Started on first use; reusable
    across loaders (epochs) of one stream: each ``start`` supersedes the previous request. Spawned (not forked), so it
    is safe from a process with CUDA or communication threads; it exits when its parent dies."""

    def __init__(self, store: Store, depth: int = 32):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1 sample, got {depth}")
        self.store, self.depth = store, depth
        self._proc: Any = None
        self._gen = 0

    def start(self, prefix: str, archives: list[str], first: int, skip: int) -> None:
        """Stream ``archives[first:]``, skipping the first ``skip`` samples of ``archives[first]``."""
        if self._proc is None:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            self._requests, self._out = ctx.Queue(), ctx.Queue(maxsize=self.depth)
            self._generation = ctx.Value("q", 0, lock=False)
            self._proc = ctx.Process(target=_prefetch_worker, daemon=True, name="k5-archive-prefetch",
                                     args=(_store_recipe(self.store), self._requests, self._out, self._generation,
                                           os.getpid()))
            self._proc.start()
        self._gen += 1
        self._generation.value = self._gen  # the worker drops what it was doing
        self._requests.put((self._gen, prefix, list(archives), first, skip))

    def next(self) -> tuple[int | None, LatentSample | None]:
        """(archive index, sample); (index, None) after an archive's last sample; (None, None) after the last one."""
        while True:
            try:
                gen, index, payload = self._out.get(timeout=1.0)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise RuntimeError(f"the archive prefetch worker died (exit code {self._proc.exitcode})") from None
                continue
            if gen != self._gen:
                continue  # read ahead for a superseded request
            if index == "error":
                raise RuntimeError(f"reading latent archives failed in the prefetch worker: {payload}")
            return index, payload

    def ahead(self) -> int:
        """Samples read ahead and waiting in the queue (approximate, as ``multiprocessing.Queue.qsize`` is)."""
        return self._out.qsize() if self._proc is not None else 0

    def close(self) -> None:
        if self._proc is not None:
            self._generation.value = -1
            self._requests.put(None)
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=2)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=2)
            self._proc = None


class PackedLatentLoader:
    def __init__(self, store: Store, prefix: str, t_max: int, image_step_fraction: float, seed: int,
                 queue_factor: float = 2.0, *, rank: int = 0, world_size: int = 1,
                 modalities: tuple[str, ...] | None = None, shuffle_seed: int | None = None,
                 res_classes: tuple[str, ...] = (), prefetcher: ArchivePrefetcher | None = None) -> None:
        """``rank``/``world_size``: this rank streams every world_size-th archive (disjoint archives per rank).
        ``modalities``: only archives of these ("image", "video"); None = all. ``shuffle_seed``: archive order
        shuffled with it before the rank split (use the same seed on every rank); None = sorted order.
        ``res_classes``: only archives of these resolution classes (low, medium, high); empty = all.
        ``prefetcher``: read and unpack the archives in its worker process (overlapped I/O); None = inline."""
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
        self.prefetcher = prefetcher
        self._open = False  # prefetched mode: an archive is open (the inline mode's ``_it is not None``)
        self._streaming = False  # prefetched mode: the worker was told where to start

    @staticmethod
    def _key(s: LatentSample) -> tuple[bool, int, int]:
        # why: queues keyed by (is_image, H, W) so images never mix with videos and one aspect ratio per batch
        return (s.latent.shape[0] == 1, s.latent.shape[1], s.latent.shape[2])

    def _pull(self) -> bool:
        """Move one sample from the archive stream into its queue; False when the dataset is exhausted."""
        if self.prefetcher is not None:
            return self._pull_prefetched()
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

    def _pull_prefetched(self) -> bool:
        if not self._open and self.cursor >= len(self.shards):
            return False  # every archive taken (the worker's end marker is not waited for)
        if not self._streaming:  # from the recorded position: the open archive minus what was taken, or the next
            first, skip = (self.cursor - 1, self._consumed) if self._open else (self.cursor, 0)
            self.prefetcher.start(self.prefix, self.shards, first, skip)
            self._streaming = True
        while True:
            index, s = self.prefetcher.next()
            if index is None:
                return False
            if s is None:  # the archive's end: the next sample opens another
                self.cursor, self._open = index + 1, False
                continue
            if not self._open or index != self.cursor - 1:
                self.cursor, self._open, self._consumed = index + 1, True, 0
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
                           [s.fps for s in out], key[0], [s.source_latent for s in out],
                           [s.source_image for s in out], [s.meta.get("t2i_caption") for s in out])

    def state_dict(self) -> dict[str, Any]:
        is_open = self._open if self.prefetcher is not None else self._it is not None
        return {"cursor": self.cursor, "open": is_open, "consumed": self._consumed,
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
        if self.prefetcher is not None:  # the worker restarts there at the next pull
            self._open, self._consumed, self._streaming = bool(st["open"]), int(st["consumed"]), False
            return
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

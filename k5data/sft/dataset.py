"""SFT partitions and their latent shards (report §4.6, §6.4).

The SFT set (the v1/v2 mix of the annotation half: one row per item with ``kind``, ``domain``, ``caption`` and a
``sample_prob``) is split into partitions, one fine-tune each: video families by VLM domain, image families by
subdomain inside each domain (``k5data.sft.subdomains``). An item's latents are not encoded again: they are read from
the pre-training latent shards (same ``sample_id``) and written to the partition's own shard prefix with the caption
field replaced by the item's caption variants (the trainer draws one per step). The mix's calibrated probabilities
become repeats inside the partition (an item drawn twice as often as the rarest one is written twice, up to
``max_repeats``), because the loader reads every archive once per epoch. A partition holds out ``val_fraction`` of its
items (at least one once it has two) as its validation set: fixed items for the stop criterion and the soup's loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from k5data.latents.plan import sample_id
from k5data.latents.shards import SAMPLES_PER_SHARD, LatentSample, Store, read_index, read_tar, write_shards
from k5data.sft.subdomains import latent_embedding, split_domain

IMAGE_FAMILIES = ("image_lite",)  # hierarchical (subdomain) partitions; video families use the domains directly


@dataclass(kw_only=True)
class SftPartitionConfig:
    """How the SFT set is split into fine-tune partitions."""

    family: str
    """Model family fine-tuned (video_lite, video_pro: domains; image_lite: subdomains inside the domains)."""
    kinds: tuple[str, ...] = ("image", "video")
    """Item kinds trained (the report's video SFT set holds videos and images; image families: images)."""
    min_items: int = 2
    """Partitions with fewer items are left out (named in the plan's ``skipped``)."""
    max_partitions: int | None = None
    """Keep only the largest N partitions (the demo trains 3); None: all."""
    val_fraction: float = 0.25
    """Share of a partition's items held out for validation (at least one when it has two or more)."""
    max_repeats: int = 4
    """Cap of an item's repeats from the mix probabilities."""
    seed: int = 0
    """Seed of the hold-out draw and of the subdomain clustering."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_items < 1 or self.max_repeats < 1:
            raise ValueError(f"min_items and max_repeats must be >= 1, got {self.min_items}, {self.max_repeats}")

    @property
    def hierarchical(self) -> bool:
        return self.family in IMAGE_FAMILIES


@dataclass
class SftPartition:
    """One fine-tune's data."""

    key: str
    domain: str
    subdomain: str | None
    train_ids: list[str]
    val_ids: list[str]
    repeats: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Items of the partition (train + validation): the soup's size weight."""
        return len(set(self.train_ids) | set(self.val_ids))  # a one-item partition lists its item in both

    @property
    def val_held_out(self) -> bool:
        """False for a one-item partition, which validates on its training item (nothing to hold out)."""
        return not set(self.val_ids) & set(self.train_ids)


def partition_key(family: str, domain: str, subdomain: str | None = None) -> str:
    return f"{family}.{domain}" + (f".{subdomain}" if subdomain is not None else "")


def _repeats(probs: dict[str, float], cap: int) -> dict[str, int]:
    low = min(probs.values())
    return {sid: max(1, min(cap, int(round(p / low)))) if low > 0 else 1 for sid, p in probs.items()}


def plan_partitions(rows: Iterable[dict[str, Any]], cfg: SftPartitionConfig,
                    embeddings: dict[str, np.ndarray] | None = None) -> tuple[list[SftPartition], dict[str, Any]]:
    """Partitions of the SFT rows (dicts with media_id, scene_index, kind, domain, sample_prob) and a report: the
    subdomain choice per domain and the partitions left out. ``embeddings`` (by sample id) are required for
    hierarchical families."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] in cfg.kinds:
            groups.setdefault(str(r["domain"]), []).append({**r, "sid": sample_id(r["media_id"], r["scene_index"])})
    report: dict[str, Any] = {"subdomains": {}, "skipped": {}}
    members: list[tuple[str, str | None, list[dict[str, Any]]]] = []
    for domain, items in sorted(groups.items()):
        if not cfg.hierarchical:
            members.append((domain, None, items))
            continue
        missing = [i["sid"] for i in items if embeddings is None or i["sid"] not in embeddings]
        if missing:
            raise ValueError(f"domain {domain}: no embedding for items {missing[:5]} (hierarchical partitions "
                             "cluster embeddings inside each domain)")
        split = split_domain(np.stack([embeddings[i["sid"]] for i in items]), seed=cfg.seed)
        report["subdomains"][domain] = {"k": split.k, "silhouettes": split.silhouettes, "reason": split.reason}
        for label in sorted(set(split.labels.tolist())):
            members.append((domain, f"s{label}", [i for i, lab in zip(items, split.labels) if lab == label]))
    rng = np.random.default_rng(cfg.seed)
    parts = []
    for domain, sub, items in members:
        key = partition_key(cfg.family, domain, sub)
        if len(items) < cfg.min_items:
            report["skipped"][key] = f"{len(items)} items < min_items {cfg.min_items}"
            continue
        ids = sorted(i["sid"] for i in items)
        n_val = 0 if len(ids) < 2 else max(1, int(math.floor(cfg.val_fraction * len(ids))))
        val = sorted(rng.choice(ids, size=n_val, replace=False).tolist()) if n_val else []
        train = [s for s in ids if s not in val]
        probs = {i["sid"]: float(i.get("sample_prob") or 1.0) for i in items if i["sid"] in train}
        parts.append(SftPartition(key, domain, sub, train, val or list(train), _repeats(probs, cfg.max_repeats)))
    parts.sort(key=lambda p: (-p.size, p.key))
    if cfg.max_partitions is not None:
        for p in parts[cfg.max_partitions:]:
            report["skipped"][p.key] = f"beyond max_partitions {cfg.max_partitions}"
        parts = parts[:cfg.max_partitions]
    return parts, report


def read_samples(store: Store, prefix: str, ids: set[str] | None = None) -> dict[str, LatentSample]:
    """Samples under a shard prefix by id (all of them, or only ``ids``), reading only the archives that hold them."""
    index = read_index(store, prefix)
    shards = {s for s, sid in zip(index.column("shard").to_pylist(), index.column("sample_id").to_pylist())
              if ids is None or sid in ids}
    out: dict[str, LatentSample] = {}
    for shard in sorted(shards):
        with store.open_read(f"{prefix}/{shard}") as f:
            for s in read_tar(f):
                if ids is None or s.id in ids:
                    out[s.id] = s
    return out


def write_partition_shards(store: Store, src_prefix: str, dst_prefix: str, part: SftPartition,
                           captions: Callable[[LatentSample], str]) -> dict[str, Any]:
    """The partition's training and validation shards (``<dst>/train``, ``<dst>/val``) from the pre-training
    shards, captions from ``captions(sample)``; returns the layout (prefixes, classes, counts) as JSON-able dict.
    Idempotent (write_shards skips listed samples)."""
    wanted = set(part.train_ids) | set(part.val_ids)
    found = read_samples(store, src_prefix, wanted)
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"partition {part.key}: items {missing[:5]} are not in the latent shards under "
                         f"{src_prefix!r}; re-materialize the latent shards after the SFT set changed")
    small = {k: 16 for k in SAMPLES_PER_SHARD}  # SFT partitions are small: several archives each, for the loader

    def copies(ids: list[str], repeats: dict[str, int]) -> Iterable[LatentSample]:
        for sid in ids:
            s = found[sid]
            for r in range(repeats.get(sid, 1)):
                yield LatentSample(sid if r == 0 else f"{sid}_r{r}", s.latent, captions(s), s.fps, s.res_class,
                                   s.scores, s.source_latent, {**s.meta, "sft_partition": part.key})

    write_shards(copies(part.train_ids, part.repeats), store, f"{dst_prefix}/train", per_shard=small)
    write_shards(copies(part.val_ids, {}), store, f"{dst_prefix}/val", per_shard=small)
    index = read_index(store, f"{dst_prefix}/train")
    classes = sorted({(m, c) for m, c in zip(index.column("modality").to_pylist(),
                                             index.column("res_class").to_pylist())})
    return {"key": part.key, "prefix": f"{dst_prefix}/train", "val_prefix": f"{dst_prefix}/val",
            "classes": [list(c) for c in classes], "train_samples": index.num_rows, **asdict(part),
            "size": part.size, "val_held_out": part.val_held_out}


def item_embeddings(store: Store, prefix: str, ids: set[str]) -> dict[str, np.ndarray]:
    """Offline embeddings of items from their latents (``subdomains.latent_embedding``)."""
    return {sid: latent_embedding(s.latent) for sid, s in read_samples(store, prefix, ids).items()}

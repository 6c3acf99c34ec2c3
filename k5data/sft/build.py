"""From the SFT set to the fine-tune partitions' shards: caption variants for every item, subdomains for image
families, one shard prefix per partition (``k5data.sft.dataset``), and a plan file listing them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from k5data.latents.plan import sample_id
from k5data.latents.shards import Store
from k5data.sft.dataset import (
    SftPartition,
    SftPartitionConfig,
    item_embeddings,
    plan_partitions,
    write_partition_shards,
)
from k5data.sft.variants import CaptionRewriter, CaptionVariants, RewriterConfig


def build_partitions(rows: list[dict[str, Any]], store: Store, src_prefix: str, dst_root: str,
                     cfg: SftPartitionConfig, rewriter: RewriterConfig, plan_path: Path,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Variants, partitions and shards of the SFT ``rows``; returns (and writes to ``plan_path``) the plan:
    ``partitions`` (each partition's layout), ``subdomains``, ``skipped``, ``variant_sources`` and ``rewriter``."""
    rows = [r for r in rows if r["kind"] in cfg.kinds]
    if not rows:
        raise ValueError(f"the SFT set holds no {list(cfg.kinds)} items for {cfg.family}")
    ids = {sample_id(r["media_id"], r["scene_index"]) for r in rows}
    embeddings = item_embeddings(store, src_prefix, ids) if cfg.hierarchical else None
    parts, report = plan_partitions(rows, cfg, embeddings)
    if not parts:
        raise ValueError(f"no SFT partition of {cfg.family} has {cfg.min_items}+ items ({report['skipped']}); lower "
                         "min_items or annotate more items")
    lm = CaptionRewriter(rewriter)
    variants: dict[str, CaptionVariants] = {}
    for r in rows:
        sid = sample_id(r["media_id"], r["scene_index"])
        if any(sid in p.train_ids or sid in p.val_ids for p in parts):
            variants[sid] = lm.variants(str(r["caption"]))
    log(f"caption variants of {len(variants)} items by {lm.name}")
    layouts = [write_partition_shards(store, src_prefix, f"{dst_root}/{p.key}", p,
                                      lambda s: variants[s.id].encode()) for p in parts]
    sources: dict[str, int] = {}
    for v in variants.values():
        for k, n in v.counts().items():
            sources[k] = sources.get(k, 0) + n
    # one item's variants for people to read (an item with Russian variants when there is one)
    example = next((v for v in variants.values() if "ru" in v.texts), next(iter(variants.values())))
    plan = {"family": cfg.family, "partitions": layouts, **report, "variant_sources": sources,
            "rewriter": lm.name, "items": len(variants), "example_variants": example.texts}
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=2, default=str))
    items_table(parts).to_parquet(plan_path.with_suffix(".items.parquet"), index=False)
    return plan


def items_table(parts: list[SftPartition]) -> pd.DataFrame:
    """Domain and subdomain as columns: one row per item with its partition, split and repeats."""
    return pd.DataFrame([{"sample_id": sid, "domain": p.domain, "subdomain": p.subdomain, "partition": p.key,
                          "split": split, "repeats": p.repeats.get(sid, 1) if split == "train" else 1}
                         for p in parts for split, ids in (("train", p.train_ids), ("val", p.val_ids))
                         for sid in ids], columns=["sample_id", "domain", "subdomain", "partition", "split",
                                                   "repeats"])

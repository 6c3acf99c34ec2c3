"""Instruct-editing samples for the latent shards (report §6.3.1): each kept pair of ``edit_pairs`` (the mining's
Parquet, contract in docs/editing.md) becomes one image sample whose latent is the TARGET, whose ``source_latent``
is the SOURCE encoded at the target's bucket (the condition channels, mask ones) and whose caption is the pair's
instruction; the source image at half size rides along for the Qwen2.5-VL edit prompt, and the target's own curated
description (``t2i_caption``) lets the same sample train text-to-image (the stages' 20 % T2I).

The rows built here go through the same planner and encoder as the curated dataset (``k5data.latents.encode``), so
buckets, resume, leases and the index behave exactly as for ``latent_shards``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

# the columns of the mining's edit_pairs this module reads (the contract has more: scores, rule, sft, ...)
PAIR_COLUMNS = ("pair_id", "source_media_id", "target_media_id", "source_uri", "target_uri", "width", "height",
                "instruction", "kept")


def edit_rows(pairs: pd.DataFrame, curated: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Planner rows (the curated dataset's columns + ``edit_source_uri``, ``t2i_caption``) of the kept pairs, and
    {pair_id: reason} of the kept pairs that cannot become samples (target not a curated image, empty
    instruction). Dropped pairs (``kept`` False) are not rows at all."""
    missing = sorted(set(PAIR_COLUMNS) - set(pairs.columns))
    if missing:
        raise ValueError(f"edit pairs lack columns {missing} (expected the edit_pairs Parquet of k5data.editing)")
    if pairs["pair_id"].duplicated().any():
        dup = pairs.loc[pairs["pair_id"].duplicated(), "pair_id"].iloc[0]
        raise ValueError(f"edit pairs list pair_id {dup!r} twice")
    images = curated[curated["kind"] == "image"].drop_duplicates("media_id").set_index("media_id")
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for pair in pairs[pairs["kept"].fillna(False).astype(bool)].to_dict("records"):
        pid, target = str(pair["pair_id"]), pair["target_media_id"]
        instruction = str(pair["instruction"] or "").strip()
        if target not in images.index:
            skipped[pid] = f"target {target!r} is not an image of the curated dataset"
            continue
        if not instruction:
            skipped[pid] = "kept pair without an instruction"
            continue
        row = images.loc[target]
        rows.append({
            "media_id": pid, "scene_index": 0, "source_uri": pair["target_uri"], "kind": "image",
            "width": int(pair["width"]), "height": int(pair["height"]), "bucket": int(row["bucket"]),
            "caption": instruction, "passed": True, "edit_source_uri": pair["source_uri"],
            "edit_source_media_id": str(pair["source_media_id"]), "t2i_caption": str(row["caption"] or ""),
            "domain": row.get("domain"), "cluster": row.get("cluster"),
        })
    columns = ["media_id", "scene_index", "source_uri", "kind", "width", "height", "bucket", "caption", "passed",
               "edit_source_uri", "edit_source_media_id", "t2i_caption", "domain", "cluster"]
    return pd.DataFrame(rows, columns=columns), skipped


def encode_edit_pairs(pairs: pd.DataFrame, curated: pd.DataFrame, store: Any, prefix: str, encoders: Any, cfg: Any,
                      endpoint_url: str | None = None, *, holder: str = "k5 edit latents") -> dict[str, Any]:
    """Encode the kept pairs into edit latent shards under ``prefix`` (``encode_dataset``'s summary, plus pair
    counts: ``pairs``, ``pairs_kept``, and the kept pairs that could not become samples in ``skipped``)."""
    from k5data.latents.encode import encode_dataset

    rows, not_samples = edit_rows(pairs, curated)
    if rows.empty:
        raise ValueError(f"none of the {len(pairs)} edit pairs is kept with an instruction and a curated image "
                         f"target ({not_samples or 'no kept pairs'}); nothing to encode")
    summary = encode_dataset(rows, store, prefix, encoders, cfg, endpoint_url, holder=holder)
    summary["skipped"] = {**summary["skipped"], **not_samples}
    summary.update(pairs=len(pairs), pairs_kept=int(pairs["kept"].fillna(False).astype(bool).sum()))
    return summary

"""Heuristic reward pairs of RL post-training (report §6.6), no human labels.

For each SFT item, its caption is the prompt; the pre-trained model (the stage the SFT soup started from) and the SFT
soup each generate one image with the same seed, and the real SFT image (a video item: its first frame) is resized to
the same size. Order: pretrain < sft < real; the three (better, worse) pairs are stored in both positions, (A, B) with
label 1 and (B, A) with label 0, with which model made each side. Items are split into train and val by a hash of their
source media id (held-out prompts of DRaFT-K are the val items).

The items are the ``sft_mix`` Parquet (:data:`ITEM_COLUMNS`, optional ``media_id``/``domain``); the output is
``pairs.parquet`` (``k5model.rl.jobs.PAIR_COLUMNS`` + ``seed_index``, ``kind``, ``domain``), ``pairs.json`` (summary)
and ``images/``. The ``reward_pairs`` asset and ``k5 rl pairs`` call :func:`build_reward_pairs`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from k5model.rl.jobs import PAIR_COLUMNS, SOURCES_WORST_TO_BEST

# columns of an SFT item the pairs read (the sft_mix table has them); media_id and domain are optional
ITEM_COLUMNS = ("item_id", "caption", "media_path", "kind")


@dataclass(frozen=True, kw_only=True)
class PairSettings:
    """How the heuristic pairs are generated."""

    height: int = 64
    """Image height of the generations and the resized real image."""
    width: int = 64
    """Image width."""
    num_steps: int = 4
    """Sampler steps of both generations."""
    guidance_scale: float = 5.0
    """CFG weight of both generations."""
    val_fraction: float = 0.4
    """Share of the items held out (reward validation, DRaFT held-out prompts); at least one each side."""
    max_items: int | None = None
    """Use at most this many SFT items (None: all)."""
    seeds_per_item: int = 1
    """Generations per item and model (each gives its own three pairs against the same real image)."""
    seed: int = 0
    """Generation j of item k uses seed + k * seeds_per_item + j, the same for both models."""


def read_sft_items(path: str | Path) -> list[dict[str, Any]]:
    """The SFT items of a Parquet table (the ``sft_mix`` asset's) as row dicts; refuses one without
    :data:`ITEM_COLUMNS`, naming the missing ones."""
    import pandas as pd

    table = pd.read_parquet(path)
    missing = [c for c in ITEM_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks SFT item columns {missing} (has {list(table.columns)}); reward pairs need "
                         f"{list(ITEM_COLUMNS)}, as in the sft_mix asset's Parquet")
    return table.to_dict("records")


def _real_image(row: Mapping[str, Any], height: int, width: int):
    from k5data.latents.media import load_image, load_video_frames, resize_cover_crop

    path = Path(str(row["media_path"]))
    rgb = load_video_frames(path, [0])[0] if row["kind"] == "video" else load_image(path)
    return resize_cover_crop(rgb, height, width)


def split_items(item_ids: list[str], val_fraction: float) -> dict[str, str]:
    """train/val per key (an item's source media) by a hash of it (stable across re-runs); at least one of each."""
    if len(item_ids) < 2:
        raise ValueError(f"reward pairs need SFT items from at least 2 media (one train, one val), got "
                         f"{len(item_ids)}")
    ranked = sorted(item_ids, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())
    n_val = min(len(ranked) - 1, max(1, round(len(ranked) * val_fraction)))
    return {i: "val" if k < n_val else "train" for k, i in enumerate(ranked)}


def build_reward_pairs(rows: list[dict[str, Any]], pretrain_dir: str | Path, sft_dir: str | Path, out: Path,
                       settings: PairSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate both models' images for every SFT item, write the images and ``pairs.parquet`` into ``out``;
    returns a summary. Image paths in the table are relative to ``out`` (``read_pairs`` resolves them), so the
    folder can be written aside and published by a rename."""
    import pandas as pd
    from PIL import Image

    from k5model.pipeline import K5Pipeline

    rows = sorted((r for r in rows if str(r.get("caption") or "").strip()), key=lambda r: str(r["item_id"]))
    rows = rows[:settings.max_items] if settings.max_items else rows
    # split by source media: two scenes of one video share their look, so they stay on the same side
    by_media = split_items(sorted({str(r.get("media_id") or r["item_id"]) for r in rows}), settings.val_fraction)
    split = {str(r["item_id"]): by_media[str(r.get("media_id") or r["item_id"])] for r in rows}
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    n = settings.seeds_per_item
    paths: dict[tuple[str, int], dict[str, str]] = {(str(r["item_id"]), j): {} for r in rows for j in range(n)}
    for source, folder in (("pretrain", pretrain_dir), ("sft", sft_dir)):
        pipe = K5Pipeline.from_pretrained(folder)
        for k, r in enumerate(rows):
            for j in range(n):
                res = pipe.generate(str(r["caption"]), height=settings.height, width=settings.width,
                                    num_frames=1 if pipe.is_video else None, num_steps=settings.num_steps,
                                    guidance_scale=settings.guidance_scale, seed=settings.seed + k * n + j,
                                    progress=False)
                path = images / f"{r['item_id']}.{j}.{source}.png"
                Image.fromarray(res.frames[0]).save(path)
                paths[str(r["item_id"]), j][source] = str(path.relative_to(out))
        log(f"reward pairs: {len(rows) * n} images from {source} ({folder})")
    for r in rows:
        path = images / f"{r['item_id']}.real.png"
        Image.fromarray(_real_image(r, settings.height, settings.width)).save(path)
        for j in range(n):
            paths[str(r["item_id"]), j]["real"] = str(path.relative_to(out))
    table, by_item = [], {str(r["item_id"]): r for r in rows}
    for (item, j), p in paths.items():
        r = by_item[item]
        for hi in range(len(SOURCES_WORST_TO_BEST)):
            for lo in range(hi):
                better, worse = SOURCES_WORST_TO_BEST[hi], SOURCES_WORST_TO_BEST[lo]
                for first, second, label in ((better, worse, 1), (worse, better, 0)):
                    table.append({"item_id": item, "prompt": str(r["caption"]), "split": split[item],
                                  "first_path": p[first], "second_path": p[second], "first_source": first,
                                  "second_source": second, "label": label, "seed_index": j,
                                  "kind": str(r["kind"]), "domain": str(r.get("domain") or "")})
    frame = pd.DataFrame(table, columns=[*PAIR_COLUMNS, "seed_index", "kind", "domain"])
    frame.to_parquet(out / "pairs.parquet", index=False)
    summary = {"items": len(rows), "pairs": len(frame), "train_items": sum(v == "train" for v in split.values()),
               "val_items": sum(v == "val" for v in split.values()), "order": " < ".join(SOURCES_WORST_TO_BEST),
               "settings": asdict(settings)}
    (out / "pairs.json").write_text(json.dumps(summary, indent=2))
    return summary

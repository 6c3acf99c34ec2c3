"""Synthetic SBS batches (no model needed): for the UI tests, the load bench and the demo's simulated judgments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.sbs.sbs_plan import Plan, PlanItem, build_plan, criteria_for, degrade_frames, golden_specs
from evaluation.sbs.sbs_scores import NA, allowed_choices


def synthetic_clip(seed: int, frames: int = 8, size: int = 64, sharp: bool = True) -> np.ndarray:
    """A small moving-square clip (F, H, W, 3) uint8; ``sharp=False`` gives a noisier, worse version."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=3)
    clip = np.zeros((frames, size, size, 3), dtype=np.uint8)
    clip[:] = base // 3
    for f in range(frames):
        x = (f * 4 + seed * 7) % (size - 16)
        clip[f, 20:36, x:x + 16] = base
    return clip if sharp else degrade_frames(clip, seed=seed, strength=0.5)


def make_batch(root: str | Path, n_items: int, annotators: list[str], overlap: int, seed: int = 0,
               kind: str = "video", n_golden: int = 2, frames: int = 8) -> Plan:
    """Write ``n_items`` synthetic pairs (+ golden pairs) under ``root`` and return their plan."""
    from k5model.media import save_media

    root = Path(root)
    ext = ".mp4" if kind == "video" else ".png"
    items: list[PlanItem] = []
    for k in range(n_items):
        a = synthetic_clip(k, frames)
        b = synthetic_clip(k + 1000, frames, sharp=k % 2 == 0)
        save_media(a if kind == "video" else a[0], root / f"p{k}_a{ext}")
        save_media(b if kind == "video" else b[0], root / f"p{k}_b{ext}")
        items.append(PlanItem(f"p{k}", f"a coloured square moving, number {k}", f"p{k}_a{ext}", f"p{k}_b{ext}",
                              kind=kind, seed=k))
    for g, (gkind, better) in enumerate(golden_specs(n_golden // 2, n_golden - n_golden // 2, seed=seed)):
        clip = synthetic_clip(500 + g, frames)
        good = f"g{g}_good{ext}"
        save_media(clip if kind == "video" else clip[0], root / good)
        if gkind == "identical":
            items.append(PlanItem(f"g{g}", "a coloured square moving", good, good, kind=kind, golden=gkind))
            continue
        bad = f"g{g}_bad{ext}"
        worse = degrade_frames(clip, seed=g)
        save_media(worse if kind == "video" else worse[0], root / bad)
        media_a, media_b = (good, bad) if better == "A" else (bad, good)
        items.append(PlanItem(f"g{g}", "a coloured square moving", media_a, media_b, kind=kind, golden=gkind,
                              better=better))
    return build_plan(items, annotators, overlap=overlap, seed=seed)


def simulate_judgments(plan: Plan, p_a: float = 0.6, seed: int = 0) -> pd.DataFrame:
    """Simulated raters (A/B terms): on each criterion prefer A with probability ``p_a`` among decisive votes, with
    ties and unconfident votes mixed in; golden pairs are answered correctly 90% of the time."""
    rng = np.random.default_rng(seed)
    by_id = {i.item_id: i for i in plan.items}
    rows = []
    for a in plan.assignments:
        item = by_id[a.item_id]
        visual, pf = criteria_for(item.kind)
        for c in visual + pf:
            opts = allowed_choices(c)
            if c == "visual_8" and rng.random() < 0.5:
                choice = NA  # no faces in this clip
            elif item.golden == "identical" and rng.random() < 0.9:
                choice = "equally"
            elif item.golden == "degraded" and rng.random() < 0.9:
                choice = "model1_better" if item.better == "A" else "model2_better"
            else:
                r = rng.random()
                if r < 0.2:  # a tie of the kinds this criterion offers (equally / both correct / both incorrect)
                    ties = [o for o in opts if o in ("equally", "both_correct", "both_incorrect")]
                    choice = ties[int(rng.integers(len(ties)))]
                elif r < 0.3 and "model1_better_unconfident" in opts:
                    choice = "model1_better_unconfident" if rng.random() < p_a else "model2_better_unconfident"
                else:
                    choice = "model1_better" if rng.random() < p_a else "model2_better"
            rows.append((a.item_id, a.annotator, c, choice))
    return pd.DataFrame(rows, columns=["item_id", "annotator", "criterion", "choice"])

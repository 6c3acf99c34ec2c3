"""An SFT annotation batch from the curated dataset (report Figure 8: the automatically filtered pre-training pool
-> coarse human screening -> expert questionnaires): the curated dataset's passed rows become items, their media are
copied next to the store, annotators get their roles and the screening queue is assigned."""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluation.sft.questionnaire import EXPERT, REGULAR
from evaluation.sft.simulate import SimulatedRaters, simulate_annotation
from evaluation.sft.store import SftItem, SftStore
from k5data.latents.media import MediaFetcher

# curated columns kept with each item for the datasets (the rest stays in the curated dataset)
ROW_FIELDS = ["media_id", "scene_index", "source_uri", "source", "start_s", "end_s", "width", "height", "bucket",
              "cluster", "quality_aesthetic", "quality_technical", "text_boxes", "domain_backend", "caption_backend"]


@dataclass(frozen=True, kw_only=True)
class SftBatchConfig:
    """Who annotates what in an SFT batch."""

    regular_annotators: list[str] = field(default_factory=lambda: ["screener_01", "screener_02"])
    """Accounts doing Stage 1 (technical screening)."""
    experts: list[str] = field(default_factory=lambda: [f"expert_{k:02d}" for k in range(1, 5)])
    """Accounts doing Stage 2 (expert questionnaires)."""
    stage1_overlap: int = 1
    """Regular annotators screening each item."""
    stage1_min_yes: float = 0.5
    """Share of screeners that must answer "yes" to every screening question for the item to pass."""
    expert_overlap: int = 3
    """Experts answering the questionnaire of each item that passed Stage 1 (the report's rule needs >= 3)."""
    max_items: int = 200
    """Cap on items taken from the curated dataset (highest aesthetic score first)."""
    min_quality_aesthetic: float | None = None
    """Only curated rows with at least this aesthetic score (None: every passed row)."""

    def __post_init__(self) -> None:
        overlap = set(self.regular_annotators) & set(self.experts)
        if overlap:
            raise ValueError(f"{sorted(overlap)} are listed both as regular annotators and experts; one role each")
        if self.max_items < 1:
            raise ValueError(f"max_items={self.max_items} must be >= 1")


def item_id_of(row: dict[str, Any] | pd.Series) -> str:
    """``<media_id>#<scene_index>``, the same form as curation's ``dup_of``."""
    return f"{row['media_id']}#{int(row['scene_index'])}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return None if value is pd.NA else value


def select_rows(curated: pd.DataFrame, cfg: SftBatchConfig) -> pd.DataFrame:
    """The curated rows an SFT batch takes: passed, above the aesthetic floor, best aesthetic first, capped."""
    rows = curated.loc[curated["passed"].fillna(False).astype(bool)]
    if cfg.min_quality_aesthetic is not None:
        rows = rows.loc[rows["quality_aesthetic"].fillna(-math.inf) >= cfg.min_quality_aesthetic]
    rows = rows.assign(_q=rows["quality_aesthetic"].fillna(-math.inf))
    return rows.sort_values(["_q", "media_id", "scene_index"], ascending=[False, True, True]).head(cfg.max_items) \
        .drop(columns="_q")


def items_from_curated(curated: pd.DataFrame, media_dir: Path, cfg: SftBatchConfig,
                       endpoint_url: str | None = None) -> list[SftItem]:
    """Items for the selected curated rows; each media file is copied once into ``media_dir`` under a name derived
    from its content id (no source names reach the annotators). ``s3://`` sources are fetched through the store."""
    media_dir.mkdir(parents=True, exist_ok=True)
    items = []
    with tempfile.TemporaryDirectory() as tmp:
        fetcher = MediaFetcher(Path(tmp), endpoint_url)
        for _, row in select_rows(curated, cfg).iterrows():
            suffix = Path(str(row["source_uri"]).split("?")[0]).suffix.lower()
            dest = media_dir / f"{hashlib.sha1(str(row['media_id']).encode()).hexdigest()[:20]}{suffix}"
            if not dest.exists():
                part = dest.with_name(dest.name + ".part")
                shutil.copyfile(fetcher.local(str(row["source_uri"])), part)
                part.replace(dest)  # atomic: a crash never leaves a half-copied file under the final name
            boxes = _jsonable(row.get("text_boxes"))
            items.append(SftItem(
                item_id=item_id_of(row), kind=str(row["kind"]), media_path=str(dest), caption=str(row["caption"] or ""),
                domain=str(row["domain"] or "other"), has_text=row["kind"] == "image" and bool(boxes),
                row={k: _jsonable(row.get(k)) for k in ROW_FIELDS}))
    return items


def create_batch(store: SftStore, curated: pd.DataFrame, media_dir: Path, cfg: SftBatchConfig,
                 endpoint_url: str | None = None) -> dict[str, int]:
    """Roles, overlaps, items and the screening queue in ``store`` (idempotent: a re-run adds only new rows and
    assignments; answers are never touched). Returns counts; a curated dataset without passed rows gives an empty
    batch (items 0), not an error, so a lineage run on a corpus that curation rejected entirely still completes."""
    for name in cfg.regular_annotators:
        store.set_role(name, REGULAR)
    for name in cfg.experts:
        store.set_role(name, EXPERT)
    if cfg.expert_overlap > len(cfg.experts):
        raise ValueError(f"expert_overlap={cfg.expert_overlap} needs at least that many experts, "
                         f"have {len(cfg.experts)}")
    store.configure(stage1_overlap=cfg.stage1_overlap, stage1_min_yes=cfg.stage1_min_yes,
                    expert_overlap=cfg.expert_overlap)
    items = items_from_curated(curated, media_dir, cfg, endpoint_url)
    added = store.add_items(items)
    assigned = store.assign_screening() if items else 0
    return {"items": len(items), "new_items": added, "new_stage1_assignments": assigned}


def prepare_batch(store: SftStore, curated: pd.DataFrame, media_dir: Path, cfg: SftBatchConfig,
                  simulate: SimulatedRaters | None = None, endpoint_url: str | None = None) -> dict[str, object]:
    """``create_batch``, then (demo / tests) the simulated annotators' answers; returns counts for the asset."""
    summary: dict[str, object] = dict(create_batch(store, curated, media_dir, cfg, endpoint_url))
    if simulate is not None:
        summary.update(simulate_annotation(store, simulate))
    outcomes = store.stage1_outcomes()
    answers = store.answers_frame()
    summary.update({"screened": len(outcomes), "stage1_passed": sum(outcomes.values()),
                    "stage1_answer_rows": int((answers["stage"] == 1).sum()),
                    "stage2_answer_rows": int((answers["stage"] == 2).sum()),
                    "simulated": simulate is not None})
    return summary

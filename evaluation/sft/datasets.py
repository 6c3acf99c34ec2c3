"""The SFT datasets from the store's consensus (report §4.6): ``v1.parquet`` (strict), ``v2.parquet`` (relaxed) and
``mix.parquet`` (v1 ∪ v2 with a per-row sampling probability), columns as agreed in /work/notes/sft_contract.md.

Mixing (the report samples "from both datasets with calibrated probabilities"): a draw comes from v1 with
probability ``p_v1`` and from v2 \\ v1 otherwise, uniformly inside each part. ``p_v1`` is either given, or calibrated
from ``v1_upweight``: a v1 row is drawn ``v1_upweight`` times as often as a v2-only row, so
``p_v1 = w·|v1| / (w·|v1| + |v2 \\ v1|)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from evaluation.sft.consensus import ConsensusConfig, item_consensus
from evaluation.sft.questionnaire import STAGE_EXPERT
from evaluation.sft.store import SftStore

COLUMNS = ["item_id", "media_id", "scene_index", "kind", "media_path", "source_uri", "start_s", "end_s", "width",
           "height", "bucket", "caption", "domain", "cluster", "has_text", "n_experts", "criteria_good",
           "min_good_fraction", "attributes", "in_v1", "in_v2"]
MIX_COLUMNS = [*COLUMNS, "sample_prob"]


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    """How training samples v1 and v2 (module docstring)."""

    p_v1: float | None = None
    """Probability a sample comes from v1; None: calibrate from ``v1_upweight``."""
    v1_upweight: float = 3.0
    """With ``p_v1`` unset: how many times more often a v1 row is drawn than a v2-only row."""

    def __post_init__(self) -> None:
        if self.p_v1 is not None and not 0.0 <= self.p_v1 <= 1.0:
            raise ValueError(f"p_v1={self.p_v1} must be in [0, 1]")
        if self.v1_upweight <= 0:
            raise ValueError(f"v1_upweight={self.v1_upweight} must be > 0")


def consensus_table(store: SftStore, cfg: ConsensusConfig) -> pd.DataFrame:
    """Every item of the store with its consensus and membership, in the contract's columns."""
    items = store.items_frame()
    cons = item_consensus(items, store.answers_frame(stage=STAGE_EXPERT), cfg)
    rows = []
    for it, c in zip(items.itertuples(index=False), cons.itertuples(index=False)):
        extra = json.loads(it.row_json)
        rows.append({"item_id": it.item_id, "media_id": extra.get("media_id"), "scene_index": extra.get("scene_index"),
                     "kind": it.kind, "media_path": it.media_path, "source_uri": extra.get("source_uri"),
                     "start_s": extra.get("start_s"), "end_s": extra.get("end_s"), "width": extra.get("width"),
                     "height": extra.get("height"), "bucket": extra.get("bucket"), "caption": it.caption,
                     "domain": it.domain, "cluster": extra.get("cluster"), "has_text": bool(it.has_text),
                     **{k: getattr(c, k) for k in ("n_experts", "criteria_good", "min_good_fraction", "attributes",
                                                   "in_v1", "in_v2")}})
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("scene_index", "width", "height", "bucket", "cluster", "n_experts"):
        df[col] = df[col].astype("Int64")
    for col in ("start_s", "end_s", "min_good_fraction"):
        df[col] = df[col].astype("float64")
    return df


def mix_table(table: pd.DataFrame, cfg: MixConfig) -> tuple[pd.DataFrame, dict[str, float]]:
    """v2 rows (v1 ⊆ v2) with ``sample_prob`` per row (sums to 1) and the effective probabilities."""
    rows = table.loc[table["in_v2"]].copy()
    n_v1, n_only = int(rows["in_v1"].sum()), int((~rows["in_v1"]).sum())
    if cfg.p_v1 is not None:
        p_v1 = cfg.p_v1
    else:
        denom = cfg.v1_upweight * n_v1 + n_only
        p_v1 = cfg.v1_upweight * n_v1 / denom if denom else 0.0
    # an empty part cannot be drawn from: its share goes to the other part
    p_v1 = 0.0 if n_v1 == 0 else (1.0 if n_only == 0 else p_v1)
    rows["sample_prob"] = [p_v1 / n_v1 if v1 else (1 - p_v1) / n_only for v1 in rows["in_v1"]]
    info = {"p_v1": p_v1, "p_v2_only": (1 - p_v1) if n_only else 0.0, "v1_rows": n_v1, "v2_only_rows": n_only}
    return rows[MIX_COLUMNS].reset_index(drop=True), info


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    df.to_parquet(part, index=False)
    part.replace(path)  # readers never see a half-written file
    return path


def write_version(table: pd.DataFrame, version: str, out_dir: Path) -> Path:
    """``out_dir/<version>.parquet`` with the rows of ``table`` in ``version`` ("v1" or "v2")."""
    if version not in ("v1", "v2"):
        raise ValueError(f"dataset version {version!r} is unknown; use 'v1' or 'v2'")
    return _write_parquet(table.loc[table[f"in_{version}"]].reset_index(drop=True), out_dir / f"{version}.parquet")


def write_mix(table: pd.DataFrame, cfg: MixConfig, out_dir: Path) -> tuple[Path, dict[str, float]]:
    """``out_dir/mix.parquet`` and ``mix.json`` (the config and the effective probabilities)."""
    mix, info = mix_table(table, cfg)
    path = _write_parquet(mix, out_dir / "mix.parquet")
    (out_dir / "mix.json").write_text(json.dumps({"config": asdict(cfg), **info}, indent=2))
    return path, info


def read_sft_dataset(path: str | Path) -> pd.DataFrame:
    """A v1 / v2 / mix Parquet written here."""
    return pd.read_parquet(path)


def _counts(df: pd.DataFrame) -> dict[str, object]:
    return {"rows": int(len(df)), "images": int((df["kind"] == "image").sum()),
            "videos": int((df["kind"] == "video").sum()),
            "domains": {str(k): int(v) for k, v in df["domain"].value_counts().sort_index().items()}}


def build_versions(store: SftStore, cfg: ConsensusConfig, out_dir: Path) -> dict[str, dict[str, object]]:
    """Consensus of the store -> ``out_dir/v1.parquet`` and ``v2.parquet``. Returns per version its path, counts
    and the inter-rater agreement per criterion (shared), plus the annotation progress."""
    from evaluation.sft.consensus import agreement_by_criterion

    table = consensus_table(store, cfg)
    agreement = agreement_by_criterion(store.answers_frame())
    screened = table.loc[table["item_id"].isin(store.stage1_outcomes())]
    progress = {"items": int(len(table)), "screened": int(len(screened)),
                "stage1_passed": int(sum(store.stage1_outcomes().values())),
                "with_experts": int((table["n_experts"] > 0).sum())}
    out = {}
    for version in ("v1", "v2"):
        path = write_version(table, version, out_dir)
        out[version] = {"path": str(path), **_counts(table.loc[table[f"in_{version}"]]), "agreement": agreement,
                        "progress": progress, "thresholds": asdict(cfg)}
    return out

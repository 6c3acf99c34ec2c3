"""Checks of a curated dataset (``k5data.curation.output.read_dataset`` rows), as the ``curated_dataset`` asset checks
run them: each returns whether the dataset passes and the counts that explain it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    metadata: dict[str, Any] = field(default_factory=dict)  # counts behind the decision (plain JSON values)


def _passed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["passed"].fillna(False).astype(bool)]


def duplicate_hashes(df: pd.DataFrame) -> CheckOutcome:
    """No two passed rows share an id (media + scene) or, within a kind, a perceptual hash."""
    passed = _passed(df)
    dup_ids = int(passed.duplicated(["media_id", "scene_index"]).sum())
    dup_hash = int(passed.duplicated(["kind", "phash"]).sum())
    return CheckOutcome(dup_ids == 0 and dup_hash == 0,
                        {"passed_rows": len(passed), "duplicate_ids": dup_ids, "duplicate_phashes": dup_hash})


def uncaptioned_rows(df: pd.DataFrame) -> CheckOutcome:
    """Every passed row has a caption that is not blank."""
    passed = _passed(df)
    missing = int((passed["caption"].fillna("").str.strip() == "").sum())
    return CheckOutcome(missing == 0, {"passed_rows": len(passed), "uncaptioned": missing})


def bucket_sanity(df: pd.DataFrame, allowed: Iterable[int]) -> CheckOutcome:
    """Passed rows exist, each in an ``allowed`` bucket that is not above its short side."""
    passed = _passed(df)
    short = passed[["width", "height"]].min(axis=1)
    bad_bucket = int((~passed["bucket"].isin(set(allowed))).sum())
    too_big = int((passed["bucket"] > short).sum())
    counts = {str(k): int(v) for k, v in passed["bucket"].value_counts().sort_index().items()}
    return CheckOutcome(len(passed) > 0 and bad_bucket == 0 and too_big == 0,
                        {"bucket_counts": counts, "invalid_bucket": bad_bucket, "bucket_above_short_side": too_big})

"""Resolution filter (report §4.2/§4.4: short side >= 256) and the short-side output bucket."""

from __future__ import annotations

from typing import Any

from k5data.curation.filters import Item, result


def score_resolution(item: Item, cfg: dict[str, Any]) -> dict[str, Any]:
    short = min(item.width, item.height)
    return result("resolution", short, "metadata", short >= cfg["min_short_side"], "resolution")


def bucket_of(short_side: int, buckets: list[int]) -> int:
    """Largest bucket not above the short side (0 below the smallest: such rows are rejected anyway)."""
    fitting = [b for b in sorted(buckets) if short_side >= b]
    return fitting[-1] if fitting else 0

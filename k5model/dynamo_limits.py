"""Room for dynamo to keep many compiled variants of one code object (the config names changed in torch 2.6).

A compiled block or encoder level that meets more shapes or settings than dynamo's default limit silently runs
eagerly from then on; the model's users that need more variants raise the limit through here.
"""

from __future__ import annotations

import contextlib

import torch


def _names() -> tuple[str, str]:
    """(per-code-object limit, accumulated limit) config names of this torch."""
    if hasattr(torch._dynamo.config, "recompile_limit"):
        return "recompile_limit", "accumulated_recompile_limit"
    return "cache_size_limit", "accumulated_cache_size_limit"


def raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep at least ``limit`` compiled variants per code object, for the rest of the process."""
    cfg, name = torch._dynamo.config, _names()[0]
    setattr(cfg, name, max(getattr(cfg, name), limit))


def recompile_limits(limit: int, accumulated: int) -> contextlib.AbstractContextManager:
    """Context in which dynamo keeps ``limit`` variants per code object and ``accumulated`` in all."""
    per_object, total = _names()
    return torch._dynamo.config.patch({per_object: limit, total: accumulated})

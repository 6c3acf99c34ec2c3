"""Kandinsky 5.0 in plain PyTorch: CrossDiT, NABLA, flow matching, sampling, encoders, training.

Never imports Dagster, MLflow or Gradio. Names are resolved lazily so that light entry points (the ``k5`` CLI's
``--help``, config-only tools) do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["PRESETS", "CrossDiT", "CrossDiTConfig", "CrossDiTOutput", "get_preset"]

if TYPE_CHECKING:
    from k5model.config import PRESETS, CrossDiTConfig, get_preset
    from k5model.crossdit import CrossDiT, CrossDiTOutput


def __getattr__(name: str) -> Any:
    if name in ("PRESETS", "CrossDiTConfig", "get_preset"):
        from k5model import config

        return getattr(config, name)
    if name in ("CrossDiT", "CrossDiTOutput"):
        from k5model import crossdit

        return getattr(crossdit, name)
    raise AttributeError(f"module 'k5model' has no attribute {name!r}")

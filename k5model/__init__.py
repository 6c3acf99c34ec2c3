"""Kandinsky 5.0 in plain PyTorch: CrossDiT, NABLA, flow matching, sampling, encoders.

Never imports Dagster, MLflow or Gradio.
"""

from k5model.config import PRESETS, CrossDiTConfig, get_preset
from k5model.crossdit import CrossDiT, CrossDiTOutput

__all__ = ["PRESETS", "CrossDiT", "CrossDiTConfig", "CrossDiTOutput", "get_preset"]

"""Kandinsky 5.0 training core: typed stage configs, the Trainer loop, FSDP2 wrapping and DCP checkpoints.

Never imports Dagster or MLflow: orchestration and tracking attach through ``Trainer.callbacks``.
"""

from k5model.training.config import STAGES, OptimConfig, StageConfig, get_stage

__all__ = ["STAGES", "OptimConfig", "StageConfig", "get_stage"]

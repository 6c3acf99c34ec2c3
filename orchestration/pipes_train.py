"""Subprocess side of a training stage launched by Dagster Pipes.

``python -m orchestration.pipes_train <k5model.training.run arguments>``: runs the same trainer as the ``k5`` CLI,
streams every step's metrics back to Dagster as Pipes log lines and reports the stage's summary as materialization
metadata. Kept outside ``k5model`` so the model library never imports Dagster code.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from dagster_pipes import PipesContext, open_dagster_pipes


class PipesStepReporter:
    """Trainer callback: one Pipes log line per step, plus running totals for the summary."""

    def __init__(self, pipes: PipesContext):
        self.pipes = pipes
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] = {}
        self.steps = 0
        self.t0 = time.perf_counter()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.first = self.first or dict(metrics)
        self.last = dict(metrics)
        self.steps += 1
        self.pipes.log.info(json.dumps({"step": step, **metrics}))

    def summary(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.t0
        loss = self.last.get("loss", math.nan)
        return {"final_loss": float(loss), "first_loss": float((self.first or {}).get("loss", math.nan)),
                "steps_run": self.steps, "seconds": round(seconds, 3),
                "steps_per_s": round(self.steps / seconds, 3) if seconds > 0 else 0.0}


def main(argv: list[str]) -> int:
    from k5model.training import run

    with open_dagster_pipes() as pipes:
        reporter = PipesStepReporter(pipes)
        result = run.main(argv, callbacks=[reporter])
        pipes.report_asset_materialization(metadata={**reporter.summary(), "stage": result["stage"],
                                                     "step": result["step"], "world_size": result["world_size"]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

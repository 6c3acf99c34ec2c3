"""Subprocess / pod side of an RL job launched by Dagster Pipes (``orchestration.rl_runs.run_rl_job``).

``python -m orchestration.pipes_rl --kind reward|draft --job JOB`` (JOB: the ``k5model.rl.jobs`` spec, inline JSON or
a file) runs the same loop as ``k5 rl reward|draft``, streaming every step's metrics to Dagster (Pipes log lines) and
to the asset's MLflow run named by ``K5_MLFLOW_RUN_ID`` (evaluation files under ``OUT/samples/step_<N>`` become
artifacts), and reports the summary as materialization metadata: the stages' reporters, reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dagster_pipes import open_dagster_pipes


def main(argv: list[str]) -> int:
    from k5model.rl.jobs import DraftTrainJob, RewardTrainJob
    from orchestration.pipes_train import run_reported

    if len(argv) != 4 or argv[0] != "--kind" or argv[2] != "--job" or argv[1] not in ("reward", "draft"):
        raise SystemExit("usage: python -m orchestration.pipes_rl --kind reward|draft --job JOB.json|'{...}'")
    if argv[1] == "reward":
        from k5model.rl.train_reward import train_reward_model as train

        job = RewardTrainJob.from_json(argv[3])
    else:
        from k5model.rl.train_draft import train_draft as train

        job = DraftTrainJob.from_json(argv[3])
    with open_dagster_pipes() as pipes:
        summary, reporter, _ = run_reported(pipes, Path(job.out), lambda callbacks: train(job, callbacks=callbacks))
        meta = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
        pipes.report_asset_materialization(metadata={**meta, "seconds": reporter.summary()["seconds"]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m orchestration.demo`` (``make demo``): the whole lineage once, on the persistent local Dagster instance.

Raw media -> curation shards -> curated dataset -> latent shards -> the Table 4 stages (demo scale) -> SBS of the last
Video Lite stage against the first -> a release in the MLflow registry, gated twice: once with a strict margin and once
with none, so both of the gate's outcomes show, each with its reason. Runs are launched the way the Dagster UI launches
them (``orchestration.launch``), so they appear in the job's history and the Overview timeline. Exit status 0 only if
every run and check that should pass did.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from orchestration.settings import K5Paths, offline_env

LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}, "execution": {"config": {"in_process": {}}}}
FAMILY = "video_lite"
STRICT_MARGIN = 0.5  # overall-score advantage a candidate must show before it becomes champion (strict gate)
SIMULATED_PREFERENCE = 0.85  # the demo's simulated raters prefer the later stage (model A) on this share of votes


def _report(name: str, result: Any, gate_may_keep: bool = False) -> bool:
    """Print what failed; ``gate_may_keep``: a failing blocking ``champion_gate`` is a decision, not an error."""
    def gate(text: str) -> bool:
        return gate_may_keep and "champion_gate" in text

    failed = [c for c in result.failed_checks if not gate(c)]
    steps = [s for s in result.step_failures if not gate(s)]
    if not failed and not steps and (result.success or gate_may_keep):
        return True
    print(f"\n{name} FAILED (run {result.run_id}): failed checks {failed}, failed steps {steps}", file=sys.stderr)
    for step in steps:
        print(f"--- {step}\n{result.step_failures[step]}", file=sys.stderr)
    if result.run_failure:
        print(result.run_failure, file=sys.stderr)
    return False


def _scalars(meta: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(meta.items())
                     if isinstance(v, int | float | str) and "\n" not in str(v) and len(str(v)) < 80)


def main() -> int:
    offline_env()
    paths = K5Paths.from_env().ensure()
    # DagsterInstance.get() reads DAGSTER_HOME; set it before Dagster is imported so nothing caches another value.
    os.environ["DAGSTER_HOME"] = str(paths.dagster_home)

    from dagster import DagsterInstance

    from assets.curation import SHARDS
    from assets.sbs import DEMO_COMPARISON, DEMO_SBS_RUN_CONFIG
    from orchestration.launch import code_location, run_job
    from orchestration.registry import release_status

    print(f"K5_HOME: {paths.home}", flush=True)
    t0 = time.perf_counter()
    with DagsterInstance.get() as instance, code_location(instance, in_process=True) as ws:
        def run(job: str, key: str | None = None, config: dict | None = None) -> Any:
            return run_job(job, instance=instance, workspace=ws, partition_key=key,
                           run_config={**LOGS, **(config or {})})

        for key in SHARDS.get_partition_keys():  # partitioned: one run per source shard
            if not _report(f"curation shard {key}", run("curation_shards_job", key)):
                return 1
        main_run = run("main_job")
        if not _report("main_job", main_run):
            return 1
        sbs_config = DEMO_SBS_RUN_CONFIG["ops"]["sbs_report"]["config"]
        sbs = run("sbs_job", DEMO_COMPARISON,
                  {"ops": {"sbs_report": {"config": {**sbs_config, "p_a": SIMULATED_PREFERENCE}}}})
        if not _report(f"sbs_job {DEMO_COMPARISON}", sbs):
            return 1
        gates = []
        for margin in (STRICT_MARGIN, 0.0):
            release = run("release_job", FAMILY, {"ops": {"release": {"config": {"margin": margin}}}})
            # a gate that keeps the champion fails its blocking check on purpose; only a broken release is an error
            if not _report(f"release_job {FAMILY} (margin {margin})", release, gate_may_keep=True):
                return 1
            gates.append((margin, release.metadata("release"), release.check_evaluations))
        elapsed = time.perf_counter() - t0

    print(f"\nThe lineage ran in {elapsed:.1f} s; runs are in the Dagster UI (job history and Overview timeline).")
    print("Curated dataset:", _scalars(dict(main_run.metadata("curated_dataset"))))
    print("Latent shards:", _scalars(dict(main_run.metadata("latent_shards"))))
    last = main_run.metadata("train_video_lite_mr_10s")
    print(f"Last Video Lite stage: pipeline {last.get('pipeline_dir')}, {last.get('samples_consumed')} samples / "
          f"{last.get('tokens_consumed')} tokens consumed, MLflow run {last.get('mlflow_run')}")
    report = sbs.metadata("sbs_report")
    print(f"SBS {DEMO_COMPARISON}: {report.get('judgments')} SIMULATED judgments (raters prefer A with p="
          f"{SIMULATED_PREFERENCE}); report {report.get('report_html')}")
    for group in ("overall_visual_quality", "overall_motion", "overall_prompt_following"):
        print(f"  {group}: {report.get(group)}")
    for margin, meta, checks in gates:
        decisions = [f"{c.check_name} {'passed' if c.passed else 'did not pass'}: "
                     f"{c.metadata['decision'].value} - {c.metadata['reason'].value}"
                     for c in checks if c.check_name == "champion_gate"]
        print(f"\nRelease with margin {margin}: version {meta.get('version')} -> {meta.get('source_uri')}")
        for line in decisions:
            print(f"  {line}")
    print("\nRegistry now:")
    for line in release_status(paths.mlflow_tracking_uri, FAMILY):
        print(f"  {line}")
    print("\nWhere to look:")
    print("  Dagster UI: make ui -> http://127.0.0.1:3000 (runs, asset lineage, checks)")
    print("  MLflow UI:  make ui -> http://127.0.0.1:5000 (stage runs under their lineage runs, the registry's "
          f"k5-{FAMILY} model)")
    print(f"  state:      {paths.home} (Dagster: {paths.dagster_home}, MLflow: {paths.mlflow_db}, "
          f"objects: {paths.object_store}, models: {paths.models}); set K5_HOME to keep it elsewhere")
    return 0


if __name__ == "__main__":
    sys.exit(main())

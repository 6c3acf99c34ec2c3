"""``python -m orchestration.demo`` (``make demo``): run ``main_job`` once on the persistent local Dagster instance.

The run is recorded in ``$K5_HOME/dagster`` (SQLite), so ``make ui`` shows it with its lineage afterwards; the MLflow
run lands in ``$K5_HOME/mlflow.db``. Exit status 0 only if the job and all its asset checks succeed.
"""

from __future__ import annotations

import os
import sys
import time
from urllib.parse import unquote, urlparse

from orchestration.settings import K5Paths, offline_env


def _local(uri: str) -> str:
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else uri


def main() -> int:
    offline_env()
    paths = K5Paths.from_env().ensure()
    # DagsterInstance.get() reads DAGSTER_HOME; set it before Dagster is imported so nothing caches another value.
    os.environ["DAGSTER_HOME"] = str(paths.dagster_home)

    from dagster import DagsterInstance

    from orchestration.definitions import defs

    print(f"K5_HOME: {paths.home}", flush=True)
    t0 = time.perf_counter()
    with DagsterInstance.get() as instance:
        # INFO console logs: the DEBUG stream of engine events would bury the summary printed below.
        run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
        # 1. curation shards (partitioned: one run per shard), so main_job can build the curated dataset from them
        shards_job = defs.resolve_job_def("curation_shards_job")
        for key in shards_job.partitions_def.get_partition_keys():
            shard = shards_job.execute_in_process(run_config=run_config, instance=instance, partition_key=key,
                                                  raise_on_error=False)
            if not shard.success:
                print(f"\ncuration shard {key} FAILED (run {shard.run_id})", file=sys.stderr)
                return 1
        # 2. every unpartitioned asset
        job = defs.resolve_job_def("main_job")
        result = job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
        elapsed = time.perf_counter() - t0
        checks = result.get_asset_check_evaluations()
        failed_checks = [c.check_name for c in checks if not c.passed]
        if not result.success or failed_checks:
            failed_steps = [e.step_key for e in result.all_events if e.is_step_failure]
            print(f"\nmain_job FAILED after {elapsed:.1f} s (run {result.run_id}); failed steps: {failed_steps}, "
                  f"failed checks: {failed_checks}", file=sys.stderr)
            for e in result.all_events:
                if e.is_step_failure and e.step_failure_data.error is not None:
                    print(e.step_failure_data.error.to_string(), file=sys.stderr)
            return 1

        # 3. an SBS batch between two demo models, scored from simulated judgments
        sbs = defs.resolve_job_def("sbs_job").execute_in_process(
            run_config=run_config, instance=instance, partition_key="demo_tiny_seed0_vs_seed1", raise_on_error=False)
        sbs_failed = [c.check_name for c in sbs.get_asset_check_evaluations() if not c.passed]
        if not sbs.success or sbs_failed:
            print(f"\nsbs_job FAILED (run {sbs.run_id}); failed checks: {sbs_failed}", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - t0
        sbs_meta = {k: v.value for m in sbs.asset_materializations_for_node("sbs_report") for k, v in m.metadata.items()}
        cur_meta = {k: v.value for m in result.asset_materializations_for_node("curated_dataset")
                    for k, v in m.metadata.items()}

        gen = {k: v.value for m in result.asset_materializations_for_node("demo_generation") for k, v in m.metadata.items()}
        print(f"\nmain_job succeeded in {elapsed:.1f} s (Dagster run {result.run_id}); "
              f"{len(checks)} checks passed: {', '.join(sorted({c.check_name for c in checks})) or 'none'}")
        print("\nGenerated media:")
        for uri in gen.get("media", []):
            print(f"  {_local(uri)}")
        if "preview_uri" in gen:
            print(f"  preview: {_local(gen['preview_uri'])}")
        print("\nCurated dataset:", ", ".join(f"{k}={cur_meta[k]}" for k in sorted(cur_meta)
                                               if isinstance(cur_meta[k], int | float | str) and "\n" not in str(cur_meta[k])))
        print("SBS report:", ", ".join(f"{k}={sbs_meta[k]}" for k in sorted(sbs_meta)
                                       if isinstance(sbs_meta[k], int | float | str) and "\n" not in str(sbs_meta[k])))
        print("\nWhere to look:")
        print("  Dagster UI: make ui -> http://127.0.0.1:3000 (runs, asset lineage, checks)")
        print(f"  MLflow UI:  make ui -> http://127.0.0.1:5000  this run: {gen.get('mlflow_run_url', '?')}")
        print(f"  state:      {paths.home} (Dagster: {paths.dagster_home}, MLflow: {paths.mlflow_db}, "
              f"objects: {paths.object_store}, models: {paths.models});"
              " set K5_HOME to keep it elsewhere")
    return 0


if __name__ == "__main__":
    sys.exit(main())

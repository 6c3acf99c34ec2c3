"""Launch a job of the code location the way the Dagster UI does, and wait for it.

``job.execute_in_process`` records a run without a remote job origin, so the UI's Overview timeline (which groups
runs by ``repositoryOrigin``) drops it and the job's Runs page (filtered by the ``.dagster/repository`` tag) never
lists it. ``run_job`` follows the UI's launch path instead (``dagster_graphql``'s ``create_valid_pipeline_run``, also
``dagster job launch``): it loads the code location exactly as ``dagster dev -m orchestration.definitions`` does (a
managed gRPC code server), creates the run with the remote job origin and the Python origin (Dagster then adds the
``dagster/code_location`` and ``.dagster/repository`` tags), and hands it to the instance's run launcher, which starts
the run worker in a child process of the code server. ``run_job`` launches directly instead of going through the run
queue (``submit_run``): nothing dequeues runs without ``dagster-daemon``, and dequeuing ends in this same
``launch_run``. It then blocks until the run ends and reads the result back from the event log.

``in_process=True`` skips the code server and the run worker process: the code location is loaded in this process
(Dagster's own in-process workspace, same location name) and the run is executed here with ``execute_run``, the call
the run worker makes. The stored run is the same (origins, tags), so the UI shows it alike; it saves a code server
start and a process start per run, which is what a demo on a laptop wants.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._cli.workspace.cli_target import WorkspaceOpts, workspace_opts_to_load_target
from dagster._config import validate_config_from_snap
from dagster._core.events import DagsterEventType
from dagster._core.execution.api import execute_run
from dagster._core.remote_representation.code_location import GrpcServerCodeLocation
from dagster._core.remote_representation.external_data import PartitionExecutionErrorSnap
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.utils import make_new_run_id
from dagster._core.workspace.context import WorkspaceProcessContext, WorkspaceRequestContext
from dagster._utils.hosted_user_process import recon_job_from_origin
from dagster.version import __version__ as dagster_version

DEFINITIONS_MODULE = "orchestration.definitions"
"""The code location ``make ui`` serves (``dagster dev -m orchestration.definitions``; [tool.dagster] in pyproject)."""
REPO_ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.5


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """A finished run as the event log recorded it."""

    run_id: str
    """Dagster run id (the UI's /runs/<run_id>)."""
    job_name: str
    """Job the run executed."""
    location_name: str
    """Code location of the run's remote job origin (what the UI groups the run under)."""
    status: DagsterRunStatus
    """Final run status (SUCCESS, FAILURE or CANCELED)."""
    check_evaluations: tuple[dg.AssetCheckEvaluation, ...] = ()
    """Every asset check evaluation of the run, in event order."""
    materializations: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Asset key (user string) -> metadata of its materializations in this run (raw values; later ones win)."""
    step_failures: Mapping[str, str] = field(default_factory=dict)
    """Step key -> error text of every failed step."""
    run_failure: str | None = None
    """The run failure message (also set when the launch itself failed), else None."""

    @property
    def success(self) -> bool:
        return self.status == DagsterRunStatus.SUCCESS

    @property
    def failed_checks(self) -> list[str]:
        """``asset:check`` names of the evaluations that did not pass."""
        return [f"{c.asset_key.to_user_string()}:{c.check_name}" for c in self.check_evaluations if not c.passed]

    def metadata(self, asset: str) -> Mapping[str, Any]:
        """Materialization metadata of ``asset`` in this run ({} if it was not materialized)."""
        return self.materializations.get(asset, {})


@contextmanager
def code_location(instance: dg.DagsterInstance, *, module: str = DEFINITIONS_MODULE,
                  working_directory: Path = REPO_ROOT, in_process: bool = False) -> Iterator[WorkspaceRequestContext]:
    """The workspace ``dagster dev -m <module>`` builds (one managed gRPC code server), open for several runs;
    ``in_process``: the same code location (same name) loaded in this process instead, no server."""
    opts = WorkspaceOpts(module_name=[module], working_directory=str(working_directory))
    target = workspace_opts_to_load_target(opts, allow_in_process=in_process)
    with WorkspaceProcessContext(instance=instance, workspace_load_target=target,
                                 version=dagster_version) as process_context:
        workspace = process_context.create_request_context()
        for name in workspace.code_location_names:
            if workspace.has_code_location_error(name):
                raise RuntimeError(f"code location {name!r} (module {module}) failed to load:\n"
                                   f"{workspace.get_code_location_error(name)}")
        yield workspace


def run_job(job_name: str, *, instance: dg.DagsterInstance, partition_key: str | None = None,
            run_config: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
            workspace: WorkspaceRequestContext | None = None, module: str = DEFINITIONS_MODULE,
            in_process: bool = False, timeout_s: float | None = None) -> RunResult:
    """Launch ``job_name`` as the UI would and block until the run ends.

    ``workspace`` (from ``code_location``) lets several runs share one code location; without it one is loaded for
    this run from ``module`` (``in_process``: in this process, and the run executes here; see the module docstring).
    With a given ``workspace``, its kind decides: a gRPC code location launches through the instance's run
    launcher, an in-process one executes here. Raises ``ValueError`` for an unknown job, a bad partition key or
    invalid run config (before any run is recorded); for a launched run, ``TimeoutError`` after ``timeout_s`` (the
    run is terminated first). A failed run is not an exception: check ``RunResult.success`` and ``failed_checks``.
    """
    if workspace is None:
        with code_location(instance, module=module, in_process=in_process) as ws:
            return run_job(job_name, instance=instance, partition_key=partition_key, run_config=run_config,
                           tags=tags, workspace=ws, timeout_s=timeout_s)
    run = _create_run(workspace, job_name, instance=instance, partition_key=partition_key,
                      run_config=dict(run_config or {}), tags=dict(tags or {}))
    if not isinstance(workspace.get_code_location(run.remote_job_origin.location_name), GrpcServerCodeLocation):
        # What the run worker does (`dagster api execute_run`), in this process. Dagster catches a Ctrl-C here and
        # records the run as FAILURE ("interrupted"), so the result reports it like any failed run.
        execute_run(recon_job_from_origin(run.job_code_origin), run, instance)
        return _result(instance, run.run_id)
    try:
        instance.launch_run(run.run_id, workspace)
    except Exception:  # launch_run has already marked the run FAILURE with the error as an engine event
        return _result(instance, run.run_id)
    try:
        _wait(instance, run.run_id, timeout_s)
    except BaseException:  # timeout or Ctrl-C: stop the run worker rather than leave it running unobserved
        if not instance.get_run_by_id(run.run_id).is_finished:
            instance.run_launcher.terminate(run.run_id)
        raise
    return _result(instance, run.run_id)


def _create_run(workspace: WorkspaceRequestContext, job_name: str, *, instance: dg.DagsterInstance,
                partition_key: str | None, run_config: dict[str, Any], tags: dict[str, str]) -> dg.DagsterRun:
    # The single repository of the single code location, as in `dagster job launch` without --location/--repository.
    (location_name,) = workspace.code_location_names
    location = workspace.get_code_location(location_name)
    (repo,) = location.get_repositories().values()
    jobs = {job.name: job for job in repo.get_all_jobs()}
    if job_name not in jobs:
        raise ValueError(f"no job {job_name!r} in code location {location_name!r}; jobs: "
                         f"{', '.join(sorted(j for j in jobs if not j.startswith('__')))}")
    remote_job = jobs[job_name]
    partition_sets = [p for p in repo.get_partition_sets() if p.job_name == job_name]
    if partition_key is not None or partition_sets:
        tags = {**_partition_tags(location, repo, job_name, partition_sets, partition_key, instance), **tags}
    validated = validate_config_from_snap(remote_job.config_schema_snapshot, remote_job.root_config_key, run_config)
    if not validated.success:
        raise ValueError(f"invalid run config for job {job_name!r}: "
                         + "; ".join(error.message for error in validated.errors or []))
    plan = location.get_execution_plan(remote_job, run_config, step_keys_to_execute=None, known_state=None,
                                       instance=instance)
    return instance.create_run(
        job_name=job_name, run_id=make_new_run_id(), run_config=run_config,
        resolved_op_selection=None, step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
        op_selection=None, status=DagsterRunStatus.NOT_STARTED, root_run_id=None, parent_run_id=None,
        tags={**remote_job.tags, **tags}, job_snapshot=remote_job.job_snapshot,
        execution_plan_snapshot=plan.execution_plan_snapshot, parent_job_snapshot=remote_job.parent_job_snapshot,
        remote_job_origin=remote_job.get_remote_origin(), job_code_origin=remote_job.get_python_origin(),
        asset_selection=None, asset_check_selection=None, asset_graph=workspace.asset_graph,
    )


def _partition_tags(location, repo, job_name: str, partition_sets: list, partition_key: str | None,
                    instance: dg.DagsterInstance) -> Mapping[str, str]:
    # The launchpad's partition picker: the key must be one of the job's partitions; the tags come from user code.
    if not partition_sets:
        raise ValueError(f"job {job_name!r} is not partitioned; launch it without partition_key")
    (partition_set,) = partition_sets
    known = (partition_set.get_partition_names(instance) if partition_set.has_partition_name_data()
             else getattr(location.get_partition_names_from_repo(repo.handle, job_name), "partition_names", []))
    if partition_key not in known:
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        what = "needs a partition_key" if partition_key is None else f"has no partition {partition_key!r}"
        raise ValueError(f"job {job_name!r} {what}; its partitions: {shown}")
    partition = location.get_partition_tags_from_repo(repo.handle, job_name, partition_key, instance)
    if isinstance(partition, PartitionExecutionErrorSnap):
        raise ValueError(f"partition {partition_key!r} of job {job_name!r}: tags could not be computed:\n"
                         f"{partition.error.to_string() if partition.error else 'no error details'}")
    return partition.tags


def _wait(instance: dg.DagsterInstance, run_id: str, timeout_s: float | None) -> None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not instance.get_run_by_id(run_id).is_finished:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} did not finish within {timeout_s} s; it was terminated")
        time.sleep(POLL_S)


def _result(instance: dg.DagsterInstance, run_id: str) -> RunResult:
    run = instance.get_run_by_id(run_id)
    events = instance.all_logs(run_id, of_type={
        DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_CHECK_EVALUATION,
        DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE, DagsterEventType.ENGINE_EVENT})
    checks, materializations, step_failures, run_failure, engine_errors = [], {}, {}, None, []
    for entry in events:
        event = entry.dagster_event
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            m = entry.asset_materialization
            materializations.setdefault(m.asset_key.to_user_string(), {}).update(
                {k: v.value for k, v in m.metadata.items()})
        elif event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            checks.append(event.asset_check_evaluation_data)
        elif event.event_type == DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            step_failures[event.step_key] = error.to_string() if error else event.message or "failed"
        elif event.event_type == DagsterEventType.RUN_FAILURE:
            run_failure = event.message or "run failed"
        elif event.engine_event_data and event.engine_event_data.error:  # e.g. the launch itself failed
            engine_errors.append(event.engine_event_data.error.to_string())
    if run.status == DagsterRunStatus.FAILURE and engine_errors:
        run_failure = "\n".join(filter(None, [run_failure, *engine_errors]))
    return RunResult(run_id=run_id, job_name=run.job_name,
                     location_name=run.remote_job_origin.location_name if run.remote_job_origin else "",
                     status=run.status, check_evaluations=tuple(checks), materializations=materializations,
                     step_failures=step_failures, run_failure=run_failure)

"""``orchestration.launch.run_job`` records runs as a UI launch does: a real gRPC code server for a small test code
location (tests/launch_defs.py), the instance's real run launcher, SQLite storage; then the Dagster UI's own GraphQL
queries (the Overview timeline's and the job Runs page's) are run against the instance and must find the run, while a
run made by ``execute_in_process`` is not found (what ``make demo`` recorded before)."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._cli.workspace.cli_target import WorkspaceOpts, workspace_opts_to_load_target
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import CODE_LOCATION_TAG, PARTITION_NAME_TAG, REPOSITORY_LABEL_TAG
from dagster_graphql.test.utils import execute_dagster_graphql

from orchestration.launch import DEFINITIONS_MODULE, code_location, run_job

pytestmark = pytest.mark.slow  # a real code server and run workers: about a minute

TESTS = Path(__file__).resolve().parent
MODULE = "launch_defs"

# The Overview timeline's query (dagster-webserver ui-core runs/useRunsForTimeline.tsx, CompletedRunTimelineQuery):
# done runs updated in a time bucket; runs without a repositoryOrigin are dropped, the rest grouped by
# (repositoryName, repositoryLocationName, pipelineName).
TIMELINE_QUERY = """
query CompletedRunTimelineQuery($completedFilter: RunsFilter!, $limit: Int!, $cursor: String) {
  completed: runsOrError(filter: $completedFilter, limit: $limit, cursor: $cursor) {
    ... on Runs { results { id pipelineName status startTime endTime updateTime
                            repositoryOrigin { repositoryName repositoryLocationName } } }
  }
}
"""
# The job's Runs page filter (ui-core pipelines/PipelineRunsFeedRoot.tsx): the job name and the repository label tag.
# Steps in the run worker's process (the default executor starts one process per step, as in the first test); it
# keeps the other tests to one child process per run.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
JOB_RUNS_QUERY = """
query JobRuns($filter: RunsFilter!) {
  runsOrError(filter: $filter) { ... on Runs { results { id status } } }
}
"""


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as inst:
        yield inst


@pytest.fixture(scope="module")
def workspace(instance):
    with code_location(instance, module=MODULE, working_directory=TESTS) as ws:
        yield ws


def _location_name_dagster_dev_uses(module: str, working_directory: Path) -> str:
    # `dagster dev -m <module>` turns its options into a load target with this same function.
    opts = WorkspaceOpts(module_name=[module], working_directory=str(working_directory))
    target = workspace_opts_to_load_target(opts)
    (origin,) = target.create_origins()
    return origin.location_name


def _timeline_runs(workspace, since: float) -> dict[str, dict]:
    result = execute_dagster_graphql(workspace, TIMELINE_QUERY, {
        "completedFilter": {"statuses": ["SUCCESS", "FAILURE", "CANCELED"], "updatedAfter": since,
                            "updatedBefore": time.time() + 1},
        "limit": 500})
    assert not result.errors, result.errors
    return {run["id"]: run for run in result.data["completed"]["results"]}


def _job_page_runs(workspace, job: str, location: str) -> set[str]:
    result = execute_dagster_graphql(workspace, JOB_RUNS_QUERY, {"filter": {
        "pipelineName": job, "tags": [{"key": REPOSITORY_LABEL_TAG, "value": f"__repository__@{location}"}]}})
    assert not result.errors, result.errors
    return {run["id"] for run in result.data["runsOrError"]["results"]}


def test_launched_run_is_recorded_like_a_ui_launch(instance, workspace) -> None:
    location = _location_name_dagster_dev_uses(MODULE, TESTS)
    since = time.time() - 1
    result = run_job("greeting_job", instance=instance, workspace=workspace)

    assert result.success and result.status == DagsterRunStatus.SUCCESS
    assert result.location_name == location == MODULE
    assert result.metadata("greeting") == {"words": 3, "text": "hello hello hello"}
    assert [(c.check_name, c.passed) for c in result.check_evaluations] == [("greeting_has_words", True)]
    assert result.failed_checks == [] and result.step_failures == {} and result.run_failure is None

    stored = instance.get_run_by_id(result.run_id)
    assert stored.status == DagsterRunStatus.SUCCESS and stored.job_name == "greeting_job"
    assert stored.remote_job_origin is not None and stored.job_code_origin is not None
    assert stored.remote_job_origin.location_name == location
    assert stored.remote_job_origin.job_name == "greeting_job"
    assert stored.tags[CODE_LOCATION_TAG] == location
    # The storage query behind the job page (RunsFilter with the repository label tag) finds it.
    by_label = instance.get_run_records(RunsFilter(job_name="greeting_job",
                                                   tags={REPOSITORY_LABEL_TAG: f"__repository__@{location}"}))
    assert result.run_id in {r.dagster_run.run_id for r in by_label}

    timeline = _timeline_runs(workspace, since)
    assert timeline[result.run_id]["repositoryOrigin"] == {"repositoryName": "__repository__",
                                                           "repositoryLocationName": location}
    assert timeline[result.run_id]["pipelineName"] == "greeting_job"
    assert result.run_id in _job_page_runs(workspace, "greeting_job", location)

    # The old path of `make demo`: the same job executed in process is stored without an origin, so the timeline
    # drops it and the job page never lists it.
    from launch_defs import defs

    in_process = defs.resolve_job_def("greeting_job").execute_in_process(instance=instance)
    assert in_process.success
    assert instance.get_run_by_id(in_process.run_id).remote_job_origin is None
    assert _timeline_runs(workspace, since)[in_process.run_id]["repositoryOrigin"] is None
    assert in_process.run_id not in _job_page_runs(workspace, "greeting_job", location)


def test_run_config_failed_check_and_failed_step_are_reported(instance, workspace) -> None:
    no_words = run_job("greeting_job", instance=instance, workspace=workspace,
                       run_config={**IN_PROCESS, "ops": {"greeting": {"config": {"words": 0}}}})
    assert no_words.success  # a non-blocking check failing does not fail the run ...
    assert no_words.failed_checks == ["greeting:greeting_has_words"]  # ... but is reported
    assert no_words.metadata("greeting")["words"] == 0

    broken = run_job("broken_job", instance=instance, workspace=workspace, run_config=IN_PROCESS)
    assert not broken.success and broken.status == DagsterRunStatus.FAILURE
    assert list(broken.step_failures) == ["broken"]
    assert "boom: this asset always fails" in broken.step_failures["broken"]
    assert broken.run_failure
    # A failed launched run still shows under its job in the UI.
    assert instance.get_run_by_id(broken.run_id).remote_job_origin.location_name == MODULE


def test_partition_key_and_bad_input(instance, workspace) -> None:
    result = run_job("lettered_job", instance=instance, workspace=workspace, partition_key="b", run_config=IN_PROCESS)
    assert result.success and result.metadata("lettered") == {"partition": "b"}
    assert instance.get_run_by_id(result.run_id).tags[PARTITION_NAME_TAG] == "b"

    runs_before = len(instance.get_run_records())
    with pytest.raises(ValueError, match=r"job 'lettered_job' has no partition 'zz'; its partitions: a, b"):
        run_job("lettered_job", instance=instance, workspace=workspace, partition_key="zz")
    with pytest.raises(ValueError, match=r"job 'lettered_job' needs a partition_key; its partitions: a, b"):
        run_job("lettered_job", instance=instance, workspace=workspace)
    with pytest.raises(ValueError, match=r"job 'greeting_job' is not partitioned"):
        run_job("greeting_job", instance=instance, workspace=workspace, partition_key="a")
    with pytest.raises(ValueError, match=r"no job 'nope' in code location 'launch_defs'.*greeting_job"):
        run_job("nope", instance=instance, workspace=workspace)
    with pytest.raises(ValueError, match=r"invalid run config for job 'greeting_job'.*wordz"):
        run_job("greeting_job", instance=instance, workspace=workspace,
                run_config={"ops": {"greeting": {"config": {"wordz": 1}}}})
    assert len(instance.get_run_records()) == runs_before  # nothing recorded for a rejected launch


def test_in_process_run_is_stored_alike_and_found_by_the_ui(instance, workspace) -> None:
    since = time.time() - 1
    with code_location(instance, module=MODULE, working_directory=TESTS, in_process=True) as here:
        assert here.code_location_names == [MODULE]  # the name the UI's gRPC location has
        result = run_job("greeting_job", instance=instance, workspace=here, run_config=IN_PROCESS)
        failed = run_job("broken_job", instance=instance, workspace=here, run_config=IN_PROCESS)
    assert result.success and result.metadata("greeting")["words"] == 3 and result.failed_checks == []
    assert not failed.success and "boom" in failed.step_failures["broken"]
    stored = instance.get_run_by_id(result.run_id)
    assert stored.remote_job_origin.location_name == MODULE and stored.tags[CODE_LOCATION_TAG] == MODULE
    # The UI (served from the gRPC code location) finds both under their jobs.
    timeline = _timeline_runs(workspace, since)
    for run in (result, failed):
        assert timeline[run.run_id]["repositoryOrigin"] == {"repositoryName": "__repository__",
                                                            "repositoryLocationName": MODULE}
    assert result.run_id in _job_page_runs(workspace, "greeting_job", MODULE)
    assert failed.run_id in _job_page_runs(workspace, "broken_job", MODULE)


def test_project_code_location_loads_under_the_name_make_ui_uses(instance) -> None:
    # `make ui` runs `dagster dev -m orchestration.definitions` from the repository root.
    expected = _location_name_dagster_dev_uses(DEFINITIONS_MODULE, TESTS.parent)
    with code_location(instance) as ws:
        assert ws.code_location_names == [expected] == [DEFINITIONS_MODULE]
        (repo,) = ws.get_code_location(expected).get_repositories().values()
        assert {"main_job", "curation_shards_job", "sbs_job"} <= {job.name for job in repo.get_all_jobs()}

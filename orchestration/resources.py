"""Dagster resources: local state paths, MLflow tracking and the object store.

Unset fields resolve from ``orchestration.settings`` when a run uses them (not at import), so one ``defs`` works for
``make demo``, ``dagster dev`` and tests that point ``K5_HOME`` at a tmp dir.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import dagster as dg

from orchestration.settings import K5Paths, offline_env

if TYPE_CHECKING:
    import mlflow

offline_env()  # before anything imports mlflow: its telemetry client reads the env at start-up

MLFLOW_UI_URL = "http://127.0.0.1:5000"


class K5HomeResource(dg.ConfigurableResource):
    """The local-state folder (see ``K5Paths``). ``home`` unset: ``$K5_HOME`` or ``<repo>/.k5``."""

    home: str | None = None

    @property
    def paths(self) -> K5Paths:
        paths = K5Paths(Path(self.home).expanduser().resolve()) if self.home else K5Paths.from_env()
        return paths.ensure()


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking on the SQLite store under K5_HOME by default; artifacts go to ``<K5_HOME>/mlartifacts``."""

    tracking_uri: str | None = None
    artifact_location: str | None = None  # folder or URI; the experiment's artifacts live in <this>/<experiment>
    experiment_name: str = "k5-lifecycle"
    ui_url: str = MLFLOW_UI_URL

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or K5Paths.from_env().ensure().mlflow_tracking_uri

    def _artifact_root(self) -> str | None:
        loc = self.artifact_location
        if not loc:
            if self.tracking_uri and not self.tracking_uri.startswith("sqlite:"):
                return None  # a tracking server picks (and proxies) the artifact store itself
            loc = str(K5Paths.from_env().ensure().mlflow_artifacts)
        if "://" in loc:
            return loc.rstrip("/")
        return Path(loc).expanduser().resolve().as_uri()

    def experiment_id(self) -> str:
        """Id of ``experiment_name``, created (with its artifact location) if missing."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.resolved_tracking_uri())
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        root = self._artifact_root()
        location = f"{root}/{self.experiment_name}" if root else None
        return client.create_experiment(self.experiment_name, artifact_location=location)

    @contextmanager
    def start_run(
        self, name: str, *, nested: bool = False, tags: dict[str, str] | None = None
    ) -> Iterator[mlflow.ActiveRun]:
        """``with mlflow_resource.start_run("x") as run: mlflow.log_param(...)``. The fluent API needs a global
        tracking URI: it is set for the run and restored afterwards, so other code in the process is unaffected."""
        import mlflow

        previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(self.resolved_tracking_uri())
        try:
            exp_id = self.experiment_id()
            with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=nested, tags=tags) as run:
                yield run
        finally:
            if previous is not None:
                mlflow.set_tracking_uri(previous)

    def run_url(self, run: Any) -> str:
        """Link to a run (``ActiveRun`` or ``Run``) in the MLflow UI (``make ui``)."""
        info = run.info
        return f"{self.ui_url.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"


class _LocalStore:
    """Objects as files under a root folder; keys are relative POSIX paths."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, local: Path, key: str) -> str:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(local, tmp)
        tmp.replace(dest)  # atomic on one filesystem: readers never see half a file
        return self.uri(key)

    def get_file(self, key: str, local: Path) -> Path:
        src = self.path(key)
        if not src.is_file():
            raise FileNotFoundError(f"object {key!r} not found at {src}")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local)
        return local

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()


class ObjectStoreResource(dg.ConfigurableResource):
    """Small blob store for pipeline outputs (media, previews). ``base_uri`` unset: ``<K5_HOME>/objects``.

    Only local folders (a path or ``file://`` URI) are implemented; another scheme (``s3://bucket/prefix``) is meant
    to add a backend class with the same four methods in ``_backend`` without changing callers.
    """

    base_uri: str | None = None

    def _backend(self) -> _LocalStore:
        base = self.base_uri or str(K5Paths.from_env().ensure().object_store)
        parsed = urlparse(base)
        if parsed.scheme in ("", "file"):
            root = Path(unquote(parsed.path) if parsed.scheme == "file" else base).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            return _LocalStore(root)
        raise NotImplementedError(f"object store scheme {parsed.scheme!r} ({base}) is not supported yet; use a local path")

    @staticmethod
    def _check_key(key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid object key {key!r}: use a relative path like 'demo/run/video_00.mp4'")
        return key

    def put_file(self, local: str | Path, key: str) -> str:
        """Copy a local file to ``key``; returns its URI."""
        return self._backend().put_file(Path(local), self._check_key(key))

    def get_file(self, key: str, local: str | Path) -> Path:
        """Copy object ``key`` to the local path ``local``; returns it."""
        return self._backend().get_file(self._check_key(key), Path(local))

    def uri(self, key: str) -> str:
        return self._backend().uri(self._check_key(key))

    def exists(self, key: str) -> bool:
        return self._backend().exists(self._check_key(key))


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resource set of ``defs``; everything resolves from K5_HOME at run time."""
    return {"k5_home": K5HomeResource(), "mlflow": MLflowResource(), "object_store": ObjectStoreResource()}

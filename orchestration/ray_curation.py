"""A local Ray cluster for curation (``CurationResource.ray_address``): a head node and worker nodes on 127.0.0.1,
each a ``ray start --block`` process in its own process group, stopped by that group's id on exit.

Used by ``make prod-local`` (``orchestration.prod_local``) and the Ray tests. A production cluster is KubeRay or any
Ray cluster whose workers mount the K5 home at the same path (see docs/deploy.md); this module only starts one here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestration.local_postgres import _free_port as free_port

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 180.0  # a loaded 2-core machine takes ~20-60 s to bring up the head and a worker


@dataclass(frozen=True, kw_only=True)
class LocalRayCluster:
    """A running local cluster."""

    address: str
    """``127.0.0.1:<gcs port>``: what ``ray.init(address=...)`` / ``CurationResource.ray_address`` take."""
    nodes: int
    """Head + workers."""
    temp_dir: Path
    """Ray's session folder (logs)."""


def _ray_cli() -> str:
    cli = Path(sys.executable).with_name("ray")
    if not cli.exists():
        raise FileNotFoundError(f"no `ray` command beside {sys.executable}: pip install ray (see pyproject.toml)")
    return str(cli)


def _wait_port(port: int, deadline: float, proc: subprocess.Popen) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited with code {proc.returncode} before listening on port {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"ray head did not listen on 127.0.0.1:{port} within {READY_TIMEOUT_S:.0f} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    # Workers first, head last. SIGTERM lets `ray start --block` stop its raylet and worker processes.
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def local_ray_cluster(*, workers: int = 1, cpus_per_node: int = 1, object_store_mb: int = 100,
                      env: Mapping[str, str] | None = None) -> Iterator[LocalRayCluster]:
    """Start a head and ``workers`` worker nodes (``cpus_per_node`` CPUs each, tiny object stores) on 127.0.0.1;
    waits until every node has joined. ``env`` is added to the nodes' environment (their task processes inherit it).
    The calling process is connected to the cluster (``ray.init``) while the context is open."""
    import ray

    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="k5ray-"))  # short path: Ray's unix sockets live under it
    node_env = {**os.environ, **(env or {}), "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--num-gpus=0",
              f"--object-store-memory={object_store_mb * 1024 * 1024}", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    address = f"127.0.0.1:{port}"
    logs = temp_dir / "nodes.log"
    try:
        with open(logs, "ab") as log:
            procs.append(subprocess.Popen(
                [_ray_cli(), "start", "--head", f"--port={port}", "--include-dashboard=false",
                 f"--temp-dir={temp_dir}", *common], cwd=REPO, env=node_env, stdout=log, stderr=log,
                start_new_session=True))
            _wait_port(port, deadline, procs[0])
            for _ in range(workers):
                procs.append(subprocess.Popen([_ray_cli(), "start", f"--address={address}", *common], cwd=REPO,
                                              env=node_env, stdout=log, stderr=log, start_new_session=True))
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        while sum(n["Alive"] for n in ray.nodes()) < 1 + workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {sum(n['Alive'] for n in ray.nodes())} of {1 + workers} Ray nodes joined "
                                   f"within {READY_TIMEOUT_S:.0f} s; logs: {logs}")
            time.sleep(0.5)
        yield LocalRayCluster(address=address, nodes=1 + workers, temp_dir=temp_dir)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop(procs)

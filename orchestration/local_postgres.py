"""A throwaway PostgreSQL server from the distribution's binaries (Debian's ``postgresql`` package): ``initdb`` and
``pg_ctl`` in a temp folder, listening on 127.0.0.1 only, password authentication, removed on exit.

Used by the tests of the Postgres-backed Dagster instance (``infra/dagster.yaml``) and for running the code location
against Postgres on one machine. PostgreSQL refuses to run as root, so when this process is root the server runs as
the ``postgres`` system user the package creates (``nobody`` where it does not exist); the data folder is then made
in the system temp dir, which that user can reach.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "install Debian's postgresql package (`make postgres`, or apt-get install postgresql)"
START_ATTEMPTS = 3  # a port picked as free can be taken before the server binds it; then another port is tried


@dataclass(frozen=True, kw_only=True)
class PostgresServer:
    """A running local server and how to reach it."""

    host: str
    """Listen address (always 127.0.0.1)."""
    port: int
    """TCP port."""
    user: str
    """Superuser role created by initdb."""
    password: str
    """Its password (random per server)."""
    data_dir: Path
    """Cluster data folder (removed when the server stops)."""

    def url(self, db: str) -> str:
        """SQLAlchemy URL of database ``db`` (psycopg2 driver, which dagster-postgres installs)."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/{db}"

    def dagster_env(self, db: str) -> dict[str, str]:
        """The ``DAGSTER_PG_*`` variables ``infra/dagster.yaml`` reads, pointing at database ``db``."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_DB": db,
                "DAGSTER_PG_USER": self.user, "DAGSTER_PG_PASSWORD": self.password}


def postgres_bin_dir() -> Path | None:
    """Folder with ``initdb``/``pg_ctl``: the newest ``/usr/lib/postgresql/<major>/bin`` (Debian keeps them off
    PATH), else the folder of ``initdb`` on PATH; None when neither exists."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if found:
        return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as: None (this process's) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and there is no 'postgres' or 'nobody' account to run PostgreSQL as; "
                       "create an unprivileged user or run as one")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_postgres(*, databases: Sequence[str] = ("dagster",), user: str = "k5",
                   start_timeout_s: int = 60) -> Iterator[PostgresServer]:
    """Start a fresh server with ``databases`` created (owned by ``user``), yield it, stop it and delete its files.

    Durability is traded for speed (``fsync=off``): the cluster is thrown away anyway. Raises ``FileNotFoundError``
    when the PostgreSQL binaries are missing, ``RuntimeError`` (with the server log) when it does not start.
    """
    import psycopg2

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError(f"no PostgreSQL server binaries (initdb) found: {INSTALL_HINT}")
    account = _server_account()
    as_account = {} if account is None else {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    root = Path(tempfile.mkdtemp(prefix="k5-postgres-"))
    try:
        if account is not None:
            os.chown(root, account.pw_uid, account.pw_gid)
        password = secrets.token_urlsafe(18)
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if account is not None:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        data = root / "data"
        _run([bin_dir / "initdb", "-D", data, "-U", user, "--pwfile", pwfile, "--auth", "scram-sha-256",
              "-E", "UTF8", "--no-locale", "--no-sync"], as_account, "initdb")
        pwfile.unlink()
        port = _start(bin_dir, data, root, as_account, start_timeout_s)
        server = PostgresServer(host="127.0.0.1", port=port, user=user, password=password, data_dir=data)
        try:
            conn = psycopg2.connect(host=server.host, port=port, user=user, password=password, dbname="postgres")
            try:
                conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
                with conn.cursor() as cur:
                    for db in databases:
                        cur.execute(f'CREATE DATABASE "{db}" OWNER "{user}"')
            finally:
                conn.close()
            yield server
        finally:
            _run([bin_dir / "pg_ctl", "stop", "-D", data, "-m", "fast", "-w"], as_account, "pg_ctl stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _start(bin_dir: Path, data: Path, root: Path, as_account: dict, timeout_s: int) -> int:
    log = root / "server.log"
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        # The socket folder is ours too: Debian's default (/var/run/postgresql) may not exist or be writable.
        options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        proc = subprocess.run([bin_dir / "pg_ctl", "start", "-D", data, "-l", log, "-w", "-t", str(timeout_s),
                               "-o", options], capture_output=True, text=True, **as_account)
        if proc.returncode == 0:
            return port
        text = log.read_text() if log.exists() else ""
        if "could not bind" not in text and "already in use" not in text:
            break
    raise RuntimeError(f"PostgreSQL did not start (pg_ctl exit {proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
                       f"server log {log}:\n{log.read_text() if log.exists() else '(none)'}")


def _run(cmd: list, as_account: dict, what: str) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **as_account)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
                           f"{proc.stdout}{proc.stderr}")

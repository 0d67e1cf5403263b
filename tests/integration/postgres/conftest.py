"""A throwaway PostgreSQL server for the store's integration tests: a fresh cluster in a temporary folder, on
127.0.0.1 and a free port, stopped by its PID at the end of the session.

The tests skip with the reason when PostgreSQL's programs or the psycopg driver are absent, unless
DEFECT_LOOP_REQUIRE_POSTGRES=1 (CI installs both) turns that into a failure. As root (CI), the server runs as the
`postgres` user the Debian package creates: PostgreSQL refuses to run as root.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRE = os.environ.get("DEFECT_LOOP_REQUIRE_POSTGRES") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (DEFECT_LOOP_REQUIRE_POSTGRES=1)")
    pytest.skip(reason)


def postgres_bindir() -> Path | None:
    """Where initdb and postgres are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    port: int
    pid: int  # the postmaster's

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on the server; its SQLAlchemy URL."""
        import psycopg

        name = f"loop_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        import psycopg
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install -e '.[test]' installs it)")
    bindir = postgres_bindir()
    if bindir is None:
        _unavailable("PostgreSQL's programs (initdb, postgres) are not installed: apt-get install postgresql")
    run_as: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="defect-loop-pg-"))  # not under pytest's tmp: that is 0700, closed to `postgres`
    data, sockets, log = base / "data", base / "sockets", base / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no `postgres` user to run PostgreSQL as (it refuses root)")
        base.chmod(0o755)
        data.mkdir()
        for path in (data, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
        log.touch()
        os.chown(log, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    port = _free_port()
    with open(log, "ab") as log_file:
        # fsync off: a test server's data is thrown away anyway
        process = subprocess.Popen([*run_as, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
                                    "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"],
                                   stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"PostgreSQL did not start on 127.0.0.1:{port}: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    postmaster_pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    try:
        yield PostgresServer(port=port, pid=postmaster_pid)
    finally:
        os.kill(postmaster_pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(postmaster_pid, signal.SIGKILL)
            process.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)

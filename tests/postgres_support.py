"""A private PostgreSQL server for the journal's tests: Debian's binaries, a cluster in a temp dir.

`postgres_server` (session) runs initdb and starts `postgres` on a free 127.0.0.1 port (no
fsync: nothing here must survive the machine), and always stops it and removes its files;
`postgres_dsn` gives each test a schema of its own in it. As root (initdb refuses root), the
server runs as the `postgres` user that Debian's package creates; it is stopped even if pytest
dies without its teardown (setpriv's parent-death signal). Without PostgreSQL the tests
skip, saying so (in CI a skip fails: `.ci/install-test-tools` installs the `postgresql` package).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DEBIAN_ROOT = Path("/usr/lib/postgresql")
USER = "journal"  # the cluster's superuser (trust authentication, 127.0.0.1 only)


def _binaries() -> Path | None:
    """The newest installed version's bin/ (Debian keeps initdb out of PATH)."""
    versions = sorted(
        (p for p in DEBIAN_ROOT.glob("*/bin") if (p / "initdb").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else None


def _as_server(*command: str) -> list[str]:
    """`command` run by setpriv (util-linux): as the `postgres` user when we are root, and
    stopped (SIGINT: a fast shutdown) if this process dies without stopping it."""
    drop = ["--reuid=postgres", "--regid=postgres", "--init-groups"] if os.geteuid() == 0 else []
    return ["setpriv", "--pdeathsig=INT", *drop, "--", *command]


def problem() -> str | None:
    """Why no server can be started here, or None."""
    if _binaries() is None:
        return f"no PostgreSQL server binaries in {DEBIAN_ROOT} (apt-get install postgresql)"
    if shutil.which("setpriv") is None:
        return "no setpriv command (util-linux)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no `postgres` user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def dsn(self) -> str:
        """A libpq URL (what a journal store's settings take)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return "(no log)"


def _wait_ready(server: PostgresServer, timeout: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"postgres exited ({server.process.returncode}):\n{server.log_tail()}"
            )
        try:
            psycopg.connect(server.dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.05)
    raise RuntimeError(f"postgres not ready after {timeout}s ({last}):\n{server.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(2)  # SIGINT: a fast shutdown (clients cut, no checkpoint wait)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    reason = problem()
    if reason is not None:
        pytest.skip(reason)
    binaries = _binaries()
    assert binaries is not None
    # Not under the run's temp dir (private to root, and watched for sandbox leaks): /dev/shm
    # when there is one (no disk writes at all), else /tmp.
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else "/tmp"
    root = Path(tempfile.mkdtemp(prefix="journal-pg-", dir=base))
    process: subprocess.Popen[bytes] | None = None
    try:
        data, log = root / "data", root / "postgres.log"
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(root, account.pw_uid, account.pw_gid)
        subprocess.run(
            _as_server(str(binaries / "initdb"), "-D", str(data), "-U", USER, "-A", "trust",
                       "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"),
            cwd=root, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        port = _free_port()
        with log.open("wb") as out:
            process = subprocess.Popen(
                _as_server(str(binaries / "postgres"), "-D", str(data), "-p", str(port),
                           "-c", "listen_addresses=127.0.0.1",
                           "-c", f"unix_socket_directories={root}", "-c", "fsync=off",
                           "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                           "-c", "max_connections=60"),
                cwd=root, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        server = PostgresServer(port, process, log)
        _wait_ready(server)
        yield server
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"initdb failed: {exc.stderr.decode(errors='replace')[-2000:]}")
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A DSN whose tables land in a schema of this test's own (dropped after it)."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_server.dsn}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")

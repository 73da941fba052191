"""A private PostgreSQL for tests: initdb and pg_ctl from Debian's PostgreSQL binaries, in a
temporary folder, on a free port of 127.0.0.1, never the machine's shared server.

    with PrivatePostgres() as url:     # postgresql://edgeloop@127.0.0.1:PORT/edgeloop
        ...

With ``password=...`` connections over TCP must log in with it (scram-sha-256; the URL carries
it), so a test can try a wrong one. :meth:`PrivatePostgres.fresh_database` makes an empty
database for one test (:func:`store_location` is the fixture the store tests use: a SQLite file
or a fresh database of one server started once per session).

The data folder is a fresh ``/tmp/edgeloop-pg-*`` (the server's user must be able to reach it,
which pytest's private temporary folders do not allow), removed when the server stops.

PostgreSQL refuses to run as root; when the tests run as root the server runs as the ``postgres``
system user (Debian's package creates it) through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

__all__ = ["BACKENDS", "PrivatePostgres", "available", "pg_bin", "pg_server", "store_location"]


def pg_bin() -> Path | None:
    """The folder with initdb and pg_ctl (the newest Debian PostgreSQL), or None."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                            reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def available() -> bool:
    return pg_bin() is not None and (os.geteuid() != 0 or shutil.which("runuser") is not None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    def __init__(self, user: str = "edgeloop", database: str = "edgeloop", password: str | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="edgeloop-pg-"))
        self.user, self.database, self.password = user, database, password
        self.port = _free_port()
        self.url = self.url_of(database)
        self._made = 0
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL's initdb/pg_ctl are not installed (make test installs Debian's postgresql)")
        self.bin = bin_dir

    def url_of(self, database: str, password: str | None = None) -> str:
        secret = password if password is not None else self.password
        login = f"{self.user}:{secret}" if secret is not None else self.user
        return f"postgresql://{login}@127.0.0.1:{self.port}/{database}"

    def fresh_database(self) -> str:
        """The URL of a new, empty database on this server."""
        import psycopg
        self._made += 1
        name = f"t{os.getpid()}_{self._made}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        return self.url_of(name)

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        env = {**os.environ, **({"PGPASSWORD": self.password} if self.password is not None else {})}
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=False,
                              env=env)

    def start(self) -> str:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        data, sock = self.root / "data", self.root
        auth = ["--auth=trust"]
        if self.password is not None:
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres")
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        done = self._run(str(self.bin / "initdb"), "-D", str(data), "-U", self.user, *auth, "-E", "UTF8",
                         "--no-sync")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-300:]}")
        options = (f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        done = self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.root / "log"),
                         "-w", "-t", "60", "start")
        if done.returncode != 0:
            log = (self.root / "log").read_text()[-500:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()[-300:]} {log}")
        self._wait()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database)
        return self.url

    def _wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL did not listen on port {self.port}")

    def stop(self, mode: str = "fast", remove: bool = True) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", mode, "-w", "stop")
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """Kill -9 the server (a crash: the next start recovers from its WAL)."""
        pid_file = self.root / "data" / "postmaster.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), 9)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- pytest fixtures (import them into a test module: from tests.pg_server import pg_server, store_location)
PASSWORD = "edgeloop-test-secret"
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PrivatePostgres]:
    """One private PostgreSQL (password login) for the whole session; skipped where PostgreSQL
    or psycopg is not installed."""
    if not available():
        pytest.skip("PostgreSQL binaries not installed (make test installs Debian's postgresql)")
    pytest.importorskip("psycopg")
    server = PrivatePostgres(password=PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=BACKENDS)
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a test's store lives: a new SQLite file, or a new database on the session's server."""
    if request.param == "sqlite":
        return tmp_path / "registry.db"
    return request.getfixturevalue("pg_server").fresh_database()

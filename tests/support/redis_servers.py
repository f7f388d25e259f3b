"""Throwaway ``redis-server`` processes, and a Redis Cluster, for destructive tests.

Everything binds 127.0.0.1, keeps its data in a temporary directory and is owned by the
caller, who must stop it (every object is a context manager; an ``atexit`` hook also kills
whatever a crashed test left running). Use ports from your own range, never 6379.

    from tests.support.redis_servers import start_redis, start_cluster

    with start_redis(7101) as server:              # RedisServer
        server.url                                 # "redis://127.0.0.1:7101/0"
        server.client().set("k", "v")              # a sync redis-py client
        server.kill(); server.restart()            # SIGKILL / start again, same port and dir
        server.stop()                              # SIGTERM (restart() works afterwards)
    # leaving the block stops it and deletes its directory (same as server.close())

    with start_cluster([7110, 7111, 7112]) as cluster:   # three masters, no replicas
        cluster.url                                # "redis-cluster://127.0.0.1:7110,..."
        cluster.node_for_slot(slot)                # the RedisServer serving a slot
        cluster.migrate_slot(slot, cluster.servers[1])   # move a slot (and its keys)

Module-scoped pytest fixture::

    @pytest.fixture(scope="module")
    def cluster() -> Iterator[Cluster]:
        with start_cluster([7110, 7111, 7112]) as c:
            yield c

``start_redis(port, password=..., args=[...], tls=make_tls_files(dir))`` covers AUTH, extra
``redis-server`` options (e.g. ``["--appendonly", "yes"]``) and TLS-only servers;
``start_cluster(ports, tls=...)`` a TLS-only cluster (``cluster.url`` is ``rediss-cluster://``).

``redis-server`` comes from the PATH. Without it, starting a server skips the test with a
line that says what to install (fails under CI; see ``tests.support.needs``).
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from tests.support.needs import REDIS_SERVER_HINT, redis_server_binary

HASH_SLOTS = 16384
CLUSTER_HINT = (
    "a Redis Cluster needs redis-server: apt-get install redis-server (or set "
    "CREDITGATE_TEST_REDIS_URL for the other tests)"
)

_live: set[RedisServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live):
        server.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port`` and it can be bound (as redis-server binds,
    with SO_REUSEADDR, so connections lingering in TIME_WAIT don't count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int, end: int, *, cluster: bool = False) -> list[int]:
    """``count`` free ports in ``[start, end]`` (with ``cluster``, port + 10000 too)."""
    found = [
        port
        for port in range(start, end + 1)
        if port_is_free(port) and (not cluster or port_is_free(port + 10000))
    ][:count]
    if len(found) < count:
        raise RuntimeError(f"only {len(found)} free ports in {start}-{end}, need {count}")
    return found


@dataclass(frozen=True)
class TLSFiles:
    """A CA, and a server certificate for 127.0.0.1/localhost signed by it (PEM paths)."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """Write a throwaway CA and server certificate into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("creditgate test CA", ca_key, "creditgate test CA", ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("localhost", key, "creditgate test CA", ca_key, False)
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port`` with its own temporary directory."""

    host = "127.0.0.1"

    def __init__(
        self,
        port: int,
        *,
        password: str | None = None,
        args: Sequence[str] = (),
        tls: TLSFiles | None = None,
        die_with_parent: bool = False,
        missing_hint: str = REDIS_SERVER_HINT,
    ) -> None:
        self.port = port
        self.password = password
        self.tls = tls
        # The session's server: stopped by the kernel if pytest itself is killed.
        self.die_with_parent = die_with_parent
        self.missing_hint = missing_hint
        self.dir = Path(tempfile.mkdtemp(prefix=f"cg-redis-{port}-"))
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """A URL for ``connect_redis`` (database 0)."""
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    def _command(self) -> list[str]:
        command = [redis_server_binary(self.missing_hint), "--bind", self.host]
        command += ["--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        command += ["--daemonize", "no", "--protected-mode", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls:
            command += ["--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            command += ["--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        else:
            command += ["--port", str(self.port)]
        return command + self.args

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and wait until it answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        if not port_is_free(self.port):
            raise RuntimeError(f"port {self.port} is already in use")
        self.process = subprocess.Popen(
            self._command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=_kill_with_parent() if self.die_with_parent else None,
        )
        _live.add(self)
        deadline = time.monotonic() + timeout
        with self.client(socket_timeout=1) as client:
            while True:
                if not self.running:
                    raise RuntimeError(f"redis-server on port {self.port} exited: {self.log()}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server on port {self.port} did not start in time")
                time.sleep(0.02)

    def log(self, lines: int = 20) -> str:
        """The last lines of the server's log file."""
        path = self.dir / "redis.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous redis-py client (``decode_responses=True``) to this server."""
        options: dict[str, Any] = {"decode_responses": True, "socket_timeout": 5}
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        options.update(kwargs)
        return redis.Redis(self.host, self.port, password=self.password, **options)

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _live.discard(self)

    def stop(self) -> None:
        """Shut down gracefully (SIGTERM); ``restart()`` works afterwards."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        """Stop it if it runs, then start it again on the same port and directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill the process and delete its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _kill_with_parent() -> Any:
    """A preexec_fn giving the child SIGKILL when the thread that started it dies (Linux,
    main thread only: a worker thread's end would kill it too early)."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_pdeathsig() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG

    return set_pdeathsig


def start_redis(
    port: int,
    *,
    password: str | None = None,
    args: Sequence[str] = (),
    tls: TLSFiles | None = None,
    die_with_parent: bool = False,
    missing_hint: str = REDIS_SERVER_HINT,
) -> RedisServer:
    """Start a ``redis-server`` on 127.0.0.1:``port`` (see the module docstring)."""
    server = RedisServer(
        port, password=password, args=args, tls=tls, die_with_parent=die_with_parent,
        missing_hint=missing_hint,
    )  # fmt: skip
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


class Cluster:
    """A Redis Cluster of masters without replicas, each a ``RedisServer``."""

    def __init__(self, servers: list[RedisServer]) -> None:
        self.servers = servers

    @property
    def url(self) -> str:
        """A ``redis-cluster://`` URL naming every node (``rediss-cluster://`` for TLS)."""
        scheme = "rediss-cluster" if self.servers and self.servers[0].tls else "redis-cluster"
        return f"{scheme}://" + ",".join(f"{s.host}:{s.port}" for s in self.servers)

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """(host, port) of every node."""
        return [(s.host, s.port) for s in self.servers]

    def node_id(self, server: RedisServer) -> str:
        """The cluster node id of ``server``."""
        with server.client() as client:
            return str(client.execute_command("CLUSTER", "MYID"))

    def node_for_slot(self, slot: int) -> RedisServer:
        """The master serving ``slot`` (as the first node sees it)."""
        with self.servers[0].client() as client:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return self._by_port(int(master[1]))
        raise LookupError(f"slot {slot} is not served")

    def _by_port(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def begin_migration(self, slot: int, target: RedisServer) -> SlotMigration:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner; keys stay put."""
        source = self.node_for_slot(slot)
        if source is target:
            raise ValueError(f"slot {slot} is already on port {target.port}")
        with target.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        with source.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        return SlotMigration(self, slot, source, target)

    def migrate_slot(self, slot: int, target: RedisServer) -> None:
        """Move ``slot`` and all its keys to ``target``, as ``redis-cli --cluster reshard``."""
        migration = self.begin_migration(slot, target)
        migration.move_keys()
        migration.finish()

    def wait_until_consistent(self, timeout: float = 20.0) -> None:
        """Wait until every node reports cluster_state:ok and the same slot map."""
        deadline = time.monotonic() + timeout
        while True:
            views = []
            healthy = True
            for server in self.servers:
                with server.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    healthy &= "cluster_state:ok" in info
                    views.append(sorted(client.execute_command("CLUSTER", "SLOTS")))
            if healthy and all(view == views[0] for view in views):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not converge: {views}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill every node and delete their directories."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class SlotMigration:
    """A slot half-way between two nodes (see ``Cluster.begin_migration``)."""

    cluster: Cluster
    slot: int
    source: RedisServer
    target: RedisServer

    def move_keys(self, keys: Sequence[str] | None = None) -> int:
        """MIGRATE ``keys`` (default: every key left in the slot) to the target; returns
        how many moved."""
        moved = 0
        with self.source.client() as client:
            while True:
                batch = (
                    list(keys)
                    if keys is not None
                    else client.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100)
                )
                if not batch:
                    return moved
                client.execute_command(
                    "MIGRATE", self.target.host, self.target.port, "", 0, 5000, "KEYS", *batch
                )
                moved += len(batch)
                if keys is not None:
                    return moved

    def finish(self) -> None:
        """Assign the slot to the target on every node (target first, as redis-cli does)."""
        target_id = self.cluster.node_id(self.target)
        others = [s for s in self.cluster.servers if s not in (self.target, self.source)]
        for server in [self.target, self.source, *others]:
            with server.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", target_id)
        self.cluster.wait_until_consistent()


def start_cluster(
    ports: Sequence[int], *, args: Sequence[str] = (), tls: TLSFiles | None = None
) -> Cluster:
    """Start one master per port (slots split evenly, no replicas) and wait until the
    cluster is healthy. Each port + 10000 (the cluster bus) must be free too. With ``tls``
    every node serves TLS only, the cluster bus included (``rediss-cluster://``)."""
    cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    cluster_args += ["--cluster-node-timeout", "5000", *args]
    if tls:
        cluster_args += ["--tls-cluster", "yes"]
    servers: list[RedisServer] = []
    cluster = Cluster(servers)
    try:
        for port in ports:
            servers.append(start_redis(port, args=cluster_args, tls=tls, missing_hint=CLUSTER_HINT))
        share = HASH_SLOTS // len(servers)
        for index, server in enumerate(servers):
            first = index * share
            last = HASH_SLOTS - 1 if index == len(servers) - 1 else first + share - 1
            with server.client() as client:
                # Distinct config epochs up front, as redis-cli does, so no collision
                # has to be resolved before the cluster settles.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        with servers[0].client() as client:
            for server in servers[1:]:
                client.execute_command("CLUSTER", "MEET", server.host, server.port)
        cluster.wait_until_consistent()
    except BaseException:
        cluster.stop()
        raise
    return cluster

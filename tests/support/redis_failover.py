"""A Redis Cluster with one replica per master, and the faults of a failover, for tests.

    from tests.support.redis_failover import start_replicated_cluster

    with start_replicated_cluster(free_ports(6, 7400, 7499, cluster=True)) as cluster:
        cluster.url                          # every master (the replicas are found by the client)
        master = cluster.node_for_slot(slot)
        replica = cluster.replica_of(master)
        cluster.cut_replication(master)      # from now on master's writes are never replicated
        promoted = cluster.kill_master(master)   # SIGKILL, then wait until its replica serves

The first half of the ports become masters (slots split evenly), the second half their
replicas, in order. Nodes run with a short ``cluster-node-timeout`` (1000 ms, so a
failover takes ~2 s), ``cluster-require-full-coverage no`` (the other masters keep serving
while one has failed, as a production cluster should be set up) and
``cluster-replica-validity-factor 0`` (a replica whose link was cut still takes over: the
test *wants* the stale replica promoted).

Cutting replication deterministically: every replica authenticates to its master as the
ACL user ``repl``. ``cut_replication`` disables that user on the master and kills the
replica's link, so the replica cannot reconnect; the master keeps acknowledging writes
(``min-replicas-to-write`` is 0), and none of them reaches the replica. Everything written
before the cut was already sent on the link that was killed, so the cut is exact: what is
lost in the failover is precisely what the master acknowledged after ``cut_replication``
returned. (Pausing the replica instead, with SIGSTOP or ``DEBUG SLEEP``, is not exact: the
master's bytes wait in the replica's socket buffer and are applied when it wakes up.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tests.support.redis_servers import (
    CLUSTER_HINT,
    HASH_SLOTS,
    Cluster,
    RedisServer,
    start_cluster,
    start_redis,
)

__all__ = ["ReplicatedCluster", "start_replicated_cluster"]

NODE_TIMEOUT_MS = 1000
_REPL_USER, _REPL_PASSWORD = "repl", "repl-secret"


def _node_args(node_timeout_ms: int) -> list[str]:
    # start_cluster passes "--cluster-node-timeout 5000" first; a later directive wins.
    return [
        "--cluster-node-timeout", str(node_timeout_ms),
        "--cluster-require-full-coverage", "no",
        "--cluster-replica-validity-factor", "0",
        "--masteruser", _REPL_USER, "--masterauth", _REPL_PASSWORD,
        "--repl-ping-replica-period", "1",
        # A new replica's full sync starts at once (the default waits 5 s for more replicas).
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip


def _allow_replication(server: RedisServer) -> None:
    # The user replicas log in as (the default user stays open for clients).
    with server.client() as client:
        client.execute_command(
            "ACL", "SETUSER", _REPL_USER, "reset", "on", f">{_REPL_PASSWORD}", "+@all", "~*", "&*"
        )


class ReplicatedCluster(Cluster):
    """A :class:`Cluster` whose ``servers`` are every live node, masters and replicas."""

    def __init__(self, masters: list[RedisServer], replicas: list[RedisServer]) -> None:
        super().__init__([*masters, *replicas])
        self.masters = list(masters)
        self._replica_of = dict(zip((m.port for m in masters), replicas, strict=False))
        self.dead: list[RedisServer] = []

    @property
    def url(self) -> str:
        """A ``redis-cluster://`` URL naming every node, so a client that starts while one is
        down still finds the rest."""
        return "redis-cluster://" + ",".join(f"{s.host}:{s.port}" for s in self.servers)

    def replica_of(self, master: RedisServer) -> RedisServer:
        """The replica started for ``master``."""
        return self._replica_of[master.port]

    def role(self, server: RedisServer) -> str:
        """``master`` or ``slave``, as the node itself says."""
        with server.client() as client:
            return str(client.execute_command("ROLE")[0])

    def node_for_slot(self, slot: int) -> RedisServer:
        """The master serving ``slot``, as the first live node sees it."""
        with self.servers[0].client() as client:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(s for s in self.servers if s.port == int(master[1]))
        raise LookupError(f"slot {slot} is not served")

    def wait_replicated(self, timeout: float = 20.0) -> None:
        """Wait until every replica of a live master has its link up and everything its
        master wrote (pairs whose master was killed are skipped)."""
        deadline = time.monotonic() + timeout
        for master in self.masters:
            if master in self.dead:
                continue
            replica = self.replica_of(master)
            while True:
                with master.client() as m, replica.client() as r:
                    offset = int(m.info("replication")["master_repl_offset"])
                    info = r.info("replication")
                if info.get("master_link_status") == "up" and (
                    int(info.get("slave_repl_offset", -1)) >= offset
                ):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {replica.port} did not catch up: {info}")
                time.sleep(0.02)

    def cut_replication(self, master: RedisServer, timeout: float = 10.0) -> None:
        """From now on nothing ``master`` acknowledges reaches its replica (module docstring).
        Waits until the replica reports its link down."""
        with master.client() as client:
            client.execute_command("ACL", "SETUSER", _REPL_USER, "off")
            client.execute_command("CLIENT", "KILL", "TYPE", "replica")
        replica = self.replica_of(master)
        deadline = time.monotonic() + timeout
        while True:
            with replica.client() as client:
                if client.info("replication").get("master_link_status") != "up":
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.port} kept its link to {master.port}")
            time.sleep(0.01)

    def kill_master(self, master: RedisServer, timeout: float = 30.0) -> RedisServer:
        """SIGKILL ``master`` and wait until its replica was promoted and every live node maps
        the slots to it; returns the promoted replica."""
        replica = self.replica_of(master)
        master.kill()
        self.servers.remove(master)
        self.dead.append(master)
        deadline = time.monotonic() + timeout
        while True:
            if self.role(replica) == "master":
                try:
                    self.wait_until_consistent(timeout=max(0.1, deadline - time.monotonic()))
                except RuntimeError:
                    pass
                else:
                    return replica
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.port} was not promoted: {replica.log()}")
            time.sleep(0.02)

    def wait_until_consistent(self, timeout: float = 20.0) -> None:
        """Wait until every live node reports cluster_state:ok, the same slot map, and no
        slot is mapped to a dead node."""
        dead = {s.port for s in self.dead}
        deadline = time.monotonic() + timeout
        while True:
            views = []
            healthy = True
            for server in self.servers:
                with server.client() as client:
                    healthy &= "cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
                    view = sorted(
                        (start, end, int(master[1]))
                        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS")
                    )
                    views.append(view)
                    healthy &= not any(port in dead for _, _, port in view)
                    healthy &= sum(end - start + 1 for start, end, _ in view) == HASH_SLOTS
            if healthy and all(view == views[0] for view in views):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not converge: {views}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill every node (dead ones included) and delete their directories."""
        for server in [*self.servers, *self.dead]:
            server.close()


def start_replicated_cluster(
    ports: Sequence[int], *, node_timeout_ms: int = NODE_TIMEOUT_MS
) -> ReplicatedCluster:
    """Start ``len(ports) // 2`` masters and one replica each (module docstring); each
    port + 10000 must be free too. Returns once every replica is in sync."""
    if len(ports) < 6 or len(ports) % 2:
        raise ValueError("a replicated cluster needs an even number of ports, at least 6")
    half = len(ports) // 2
    args = _node_args(node_timeout_ms)
    base = start_cluster(ports[:half], args=args)
    replicas: list[RedisServer] = []
    cluster = ReplicatedCluster(base.servers, replicas)
    try:
        for server in base.servers:
            _allow_replication(server)
        for port in ports[half:]:
            server = start_redis(
                port,
                args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", *args],
                missing_hint=CLUSTER_HINT,
            )
            replicas.append(server)
            cluster.servers.append(server)
            _allow_replication(server)  # it may become a master with a replica of its own
            with base.servers[0].client() as client:
                client.execute_command("CLUSTER", "MEET", server.host, server.port)
        cluster._replica_of = {m.port: r for m, r in zip(base.servers, replicas, strict=True)}
        for master, replica in zip(base.servers, replicas, strict=True):
            master_id = cluster.node_id(master)
            deadline = time.monotonic() + 20
            with replica.client() as client:
                while True:
                    # The replica must have learned the master's id through the gossip first.
                    try:
                        client.execute_command("CLUSTER", "REPLICATE", master_id)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
        cluster.wait_replicated()
        cluster.wait_until_consistent()
    except BaseException:
        cluster.stop()
        raise
    return cluster

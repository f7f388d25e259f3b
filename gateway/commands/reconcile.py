"""``creditgate reconcile``: compare Redis balances with the ledger, and repair drift.

For every org with state in Redis, and every bucket, the *ledger state* is the newest
record by sequence number among the Postgres snapshot (``ai_tokens``) and the events still
in the shard's stream (not yet synced). Redis should hold exactly that state minus the
tokens of holds opened since (holds take tokens at admission and write their event at
settle; each hold records the org's sequence number ``s0`` when it was taken, so holds
opened before the ledger's record are already reflected in it).

The Redis side (org hash, the shard's holds and its stream) is read in one MULTI/EXEC per
shard, so it is one consistent cut; Postgres is read afterwards, and an org whose ledger
turns out to be *ahead* of that cut (the sync job committed in between) is read again
rather than reported.

Redis *behind* the ledger (its org sequence number lower than one the ledger already
recorded, in a cut read after that ledger record) means Redis lost acknowledged writes: a
Redis Cluster failover promoted a replica that never received them, or a restart from an
old AOF/RDB. The org is reported in ``lost_writes`` (how many sequence numbers Redis went
back) and its buckets are compared with the ledger like any other, so the drift is exactly
what the lost writes had charged (or granted) and the ledger knows of.

``--repair`` sets the Redis balances to the ledger's (repair.lua) and thereby writes a
``repair`` row explaining the correction; it also lifts the org's sequence number past the
ledger's, so the events written afterwards are newer than every ledger record again. Lots
of purchased tokens are rebuilt from the org's unexpired grants (Store.org_snapshot's
rule).
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.core.events import decode
from gateway.core.redis_keys import ShardKeys
from gateway.ledger.store import Store
from gateway.metering.gate import CreditGate
from gateway.redisio.lua_scripts import load

_MAX_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class BucketState:
    """Balances of one bucket as of sequence number ``seq``."""

    balance: int
    extra: int
    seq: int


@dataclass(slots=True)
class Drift:
    """One bucket whose Redis state disagrees with the ledger."""

    org: str
    bucket: str
    redis_balance: int
    redis_extra: int
    held_balance: int
    held_extra: int
    ledger_balance: int
    ledger_extra: int
    ledger_seq: int
    repaired: bool = False

    @property
    def tokens(self) -> int:
        """Tokens Redis has too many (positive) or too few (negative)."""
        return (self.redis_balance + self.held_balance + self.redis_extra + self.held_extra) - (
            self.ledger_balance + self.ledger_extra
        )


@dataclass(slots=True)
class ReconcileReport:
    """What a reconcile pass found."""

    orgs_checked: int = 0
    buckets_checked: int = 0
    drifts: list[Drift] = field(default_factory=list)
    # Orgs whose Redis sequence is ahead of every ledger record: events were lost
    # between Redis and Postgres (e.g. a stream trimmed by hand).
    missing_events: dict[str, int] = field(default_factory=dict)
    # Orgs whose Redis sequence went back behind the ledger's: Redis lost acknowledged
    # writes (a failover to a replica that lacked them); how many sequence numbers.
    lost_writes: dict[str, int] = field(default_factory=dict)
    unstable: list[str] = field(default_factory=list)  # kept changing during the pass

    @property
    def clean(self) -> bool:
        """True when nothing disagrees."""
        return (
            not self.drifts
            and not self.missing_events
            and not self.lost_writes
            and not self.unstable
        )


@dataclass(slots=True)
class _ShardCut:
    orgs: dict[str, dict[str, str]]
    held: dict[tuple[str, str], list[tuple[int, int, int]]]  # (s0, from plan, from extra)
    stream: dict[tuple[str, str], BucketState]
    stream_seq: dict[str, int]


async def _scan_orgs(gate: CreditGate, shard: ShardKeys) -> list[str]:
    prefix = shard.org_prefix
    found = []
    async for key in gate.redis.client.scan_iter(match=f"{prefix}*", count=1000):
        found.append(key[len(prefix) :] if isinstance(key, str) else key.decode()[len(prefix) :])
    return found


async def _read_shard(gate: CreditGate, shard: ShardKeys, orgs: list[str]) -> _ShardCut:
    pipe = gate.redis.client.pipeline(transaction=True)
    pipe.xrange(shard.events)
    pipe.hgetall(shard.holds)
    for org in orgs:
        pipe.hgetall(shard.org(org))
    replies: list[Any] = await pipe.execute()
    entries, holds, states = replies[0], replies[1], replies[2:]
    held: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
    for raw in holds.values():
        h = json.loads(raw)
        from_plan = int(h["pp"])
        held[(h["o"], h["b"])].append((int(h.get("s0", 0)), from_plan, int(h["c"]) - from_plan))
    stream: dict[tuple[str, str], BucketState] = {}
    stream_seq: dict[str, int] = {}
    for _, fields in entries:
        ev = decode(fields)
        if ev.seq is None:
            continue
        stream_seq[ev.org] = max(stream_seq.get(ev.org, 0), ev.seq)
        if ev.balance_after is None or ev.extra_after is None or not ev.bucket:
            continue
        current = stream.get((ev.org, ev.bucket))
        if current is None or ev.seq > current.seq:
            stream[(ev.org, ev.bucket)] = BucketState(ev.balance_after, ev.extra_after, ev.seq)
    return _ShardCut(dict(zip(orgs, states, strict=True)), dict(held), stream, stream_seq)


async def _ledger(
    store: Store, orgs: Iterable[str]
) -> tuple[dict[tuple[str, str], BucketState], dict[str, int]]:
    rows = await store.pool.fetch(
        "SELECT organization_id, token_type, balance, extra, seq FROM ai_tokens"
        " WHERE organization_id = ANY($1::text[])",
        list(orgs),
    )
    snap = {
        (r["organization_id"], r["token_type"]): BucketState(r["balance"], r["extra"], r["seq"])
        for r in rows
    }
    seqs: dict[str, int] = {}
    for (org, _), st in snap.items():
        seqs[org] = max(seqs.get(org, 0), st.seq)
    return snap, seqs


async def reconcile(gate: CreditGate, *, repair: bool = False) -> ReconcileReport:
    """Compare every org cached in Redis with the ledger; optionally repair the drift."""
    store = await gate.require_store()
    report = ReconcileReport()
    for shard in gate.keys.all_shards():
        pending = await _scan_orgs(gate, shard)
        ahead: dict[str, int] = {}  # org -> a ledger seq seen ahead of an earlier Redis cut
        for _attempt in range(_MAX_ATTEMPTS):
            if not pending:
                break
            pending = await _check_orgs(
                gate, store, shard, pending, report, ahead=ahead, repair=repair
            )
        report.unstable += pending
    return report


async def _check_orgs(
    gate: CreditGate,
    store: Store,
    shard: ShardKeys,
    orgs: list[str],
    report: ReconcileReport,
    *,
    ahead: dict[str, int],
    repair: bool,
) -> list[str]:
    """Check ``orgs`` of one shard; return those to read again (the ledger moved on).

    ``ahead`` carries, from one attempt to the next, the ledger seq that was ahead of an
    org's Redis cut: if this cut (read after that ledger record) is still behind it, no sync
    commit can explain it (Redis sequence numbers only grow), so Redis lost writes.
    """
    cut = await _read_shard(gate, shard, orgs)
    snap, ledger_seq = await _ledger(store, orgs)
    retry = []
    for org, state in cut.orgs.items():
        if not state:
            continue  # gone meanwhile: it will be seeded from the ledger on next use
        redis_seq = int(state.get("seq", 0))
        seen_seq = max(ledger_seq.get(org, 0), cut.stream_seq.get(org, 0))
        if ledger_seq.get(org, 0) > redis_seq:
            if ahead.get(org, -1) <= redis_seq:
                ahead[org] = ledger_seq[org]
                retry.append(org)
                continue
            report.lost_writes[org] = ledger_seq[org] - redis_seq
        report.orgs_checked += 1
        if 0 < seen_seq < redis_seq:
            report.missing_events[org] = redis_seq - seen_seq
        buckets = {f[2:] for f in state if f.startswith("b:")}
        for bucket in sorted(buckets):
            report.buckets_checked += 1
            ledger = _newest(snap.get((org, bucket)), cut.stream.get((org, bucket)))
            if ledger is None:
                continue  # never synced and nothing in the stream: state came from a seed
            since = [h for h in cut.held.get((org, bucket), ()) if h[0] >= ledger.seq]
            held_b, held_x = sum(h[1] for h in since), sum(h[2] for h in since)
            rb, rx = int(state.get(f"b:{bucket}", 0)), int(state.get(f"x:{bucket}", 0))
            if (rb + held_b, rx + held_x) == (ledger.balance, ledger.extra):
                continue
            drift = Drift(
                org, bucket, rb, rx, held_b, held_x, ledger.balance, ledger.extra, ledger.seq
            )
            if repair:
                drift.repaired = await _repair(gate, store, drift)
            report.drifts.append(drift)
    return retry


def _newest(a: BucketState | None, b: BucketState | None) -> BucketState | None:
    if a is None or (b is not None and b.seq > a.seq):
        return b
    return a


async def _repair(gate: CreditGate, store: Store, drift: Drift) -> bool:
    """Set Redis to the ledger's balances (less what open holds took) and log a repair row."""
    snapshot = await store.org_snapshot(drift.org)
    lots: list[list[Any]] = []
    target_extra = max(0, drift.ledger_extra - drift.held_extra)
    bucket = snapshot.buckets.get(drift.bucket)
    if bucket is not None:
        from gateway.ledger.store import allocate_lots

        grants = [
            g for g in await store.active_grants(drift.org, _now(gate)) if g.bucket == drift.bucket
        ]
        lots = [
            [lot.reference, lot.expires_ms, lot.amount]
            for lot in allocate_lots(target_extra, grants)
        ]
    elif target_extra:
        lots = [["", 0, target_extra]]
    keys = [gate.keys.org(drift.org), gate.keys.shard(drift.org).events]
    args: list[str | int] = [
        gate.clock.now_ms(),
        drift.org,
        drift.bucket,
        max(0, drift.ledger_balance - drift.held_balance),
        target_extra,
        f"reconcile-{uuid.uuid4().hex}",
        json.dumps(lots),
        # After lost writes Redis' seq is behind the ledger's: the repair event must be
        # newer than every ledger record, or the sync job would not apply it to the snapshot.
        drift.ledger_seq + 1,
    ]
    reply = await gate.redis.runner.run(load("repair"), keys, args)
    status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
    return bool(status == "ok")


def _now(gate: CreditGate) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(gate.clock.now_ms() / 1000, UTC)

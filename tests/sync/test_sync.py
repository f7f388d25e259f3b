"""The sync worker against the real Redis (unique key prefix) and Postgres (throwaway db)."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from redis import exceptions as redis_exceptions
from redis.asyncio import Redis

from gateway.core.redis_keys import KeySpace
from gateway.redisio.connect import connect_redis
from sync.worker import SyncWorker
from tests.support.pg import requires_postgres
from tests.support.services import redis_url

pytestmark = requires_postgres


NOV_15 = int(datetime(2026, 11, 15, 23, 0, tzinfo=UTC).timestamp() * 1000)
FEATURES = {"lead_generation": 5, "goal_generation": 3, "general_insights": 1}


# -- event builders (the exact gateway/core/events.py format) ---------------------------------


def event(org: str, kind: str, **f: Any) -> dict[str, str]:
    """One stream entry; unspecified fields are empty, like the Lua scripts write them."""
    base = {
        "id": f.pop("id", None) or f"{kind}:{uuid.uuid4().hex}",
        "k": kind,
        "o": org,
        "u": "",
        "f": "",
        "b": "lead_generation",
        "t": "0",
        "bal": "",
        "x": "",
        "a": "",
        "used": "",
        "per": "2026-11",
        "s": "",
        "ts": str(NOV_15),
        "rq": "",
        "st": "",
        "lat": "",
        "m": "",
        "r": "",
        "p": "pro",
        "ref": "",
    }
    for key, value in f.items():
        base[key] = str(value)
    return base


class OrgSim:
    """Generates one org's consistent events: resets, grants, charges and refunds."""

    def __init__(self, org: str, rng: random.Random) -> None:
        self.org, self.rng, self.seq = org, rng, 0
        self.state: dict[str, dict[str, int]] = {}

    def _emit(self, kind: str, bucket: str, t: int, ts: int, **extra: Any) -> dict[str, str]:
        self.seq += 1
        s = self.state[bucket]
        return event(
            self.org,
            kind,
            b=bucket,
            t=t,
            bal=s["bal"],
            x=s["x"],
            a=s["a"],
            used=s["used"],
            s=self.seq,
            ts=ts,
            **extra,
        )

    def reset(self, bucket: str, alloc: int, ts: int) -> dict[str, str]:
        s = self.state.setdefault(bucket, {"bal": 0, "x": 0, "a": 0, "used": 0})
        before = s["bal"]
        s.update(bal=alloc, a=alloc, used=0)
        return self._emit("reset", bucket, before - alloc, ts)

    def grant(self, bucket: str, amount: int, ts: int) -> dict[str, str]:
        self.state[bucket]["x"] += amount
        return self._emit("grant", bucket, -amount, ts, id=f"grant:{self.org}:{uuid.uuid4().hex}")

    def request(self, feature: str, ts: int, user: str) -> dict[str, str]:
        s, cost = self.state[feature], FEATURES[feature]
        rid = uuid.uuid4().hex
        common = {"id": rid, "rq": rid, "u": user, "f": feature, "m": "POST", "r": "/x"}
        if self.rng.random() < 0.1 or s["bal"] + s["x"] < cost:
            return self._emit("refund", feature, 0, ts, st=502, lat=7, **common)
        from_plan = min(s["bal"], cost)
        s["bal"] -= from_plan
        s["x"] -= cost - from_plan
        s["used"] += cost
        return self._emit("charge", feature, cost, ts, st=200, lat=12, **common)


def scenario(orgs: list[str], requests_per_org: int, seed: int = 7) -> list[dict[str, str]]:
    """Per org: resets and a grant per bucket, then requests over two days."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    for org in orgs:
        sim = OrgSim(org, rng)
        for feature in FEATURES:
            out.append(sim.reset(feature, 1000, NOV_15))
            out.append(sim.grant(feature, 50, NOV_15 + 1))
        for i in range(requests_per_org):
            ts = NOV_15 + 2 + i * 60_000  # crosses midnight UTC after an hour
            out.append(sim.request(rng.choice(list(FEATURES)), ts, f"user{rng.randrange(3)}"))
    return out


# -- fixtures and helpers -------------------------------------------------------------


async def xadd_all(redis: Any, ks: KeySpace, events: Iterable[dict[str, str]]) -> int:
    pipe = redis.pipeline(transaction=False)
    n = 0
    for e in events:
        pipe.xadd(ks.shard(e["o"]).events, e)
        n += 1
    await pipe.execute()
    return n


def worker(redis: Any, pool: asyncpg.Pool, ks: KeySpace, **kw: Any) -> SyncWorker:
    kw.setdefault("batch_size", 64)
    return SyncWorker(redis=redis, pool=pool, keyspace=ks, **kw)


# The writer's rollups, and the same sums grouped from usage_daily (a view of the ledger
# since 0015: what the ledger's rows sum to).
_USERS = "SELECT organization_id, day, user_id, requests, tokens FROM usage_daily_user"
_USERS_FROM_LEDGER = (
    "SELECT organization_id, day, user_id, sum(requests), sum(tokens) FROM usage_daily"
    " GROUP BY 1, 2, 3"
)
_FEATURES = (
    "SELECT organization_id, day, feature, token_type, requests, tokens FROM usage_daily_feature"
)
_FEATURES_FROM_LEDGER = (
    "SELECT organization_id, day, feature, min(token_type), sum(requests), sum(tokens)"
    " FROM usage_daily GROUP BY 1, 2, 3"
)


async def ledger(pool: asyncpg.Pool) -> dict[str, Any]:
    """Everything the sync job writes, in comparable form. ``daily`` is ``usage_daily``, a
    view of the ledger's rows; the rollups the writer keeps (per user, per feature) are
    checked here against it, so every test comparing ``daily`` checks them too."""
    async with pool.acquire() as c, c.transaction(isolation="repeatable_read"):
        for kept, derived in ((_USERS, _USERS_FROM_LEDGER), (_FEATURES, _FEATURES_FROM_LEDGER)):
            got = sorted(tuple(r) for r in await c.fetch(kept))
            assert got == sorted(tuple(r) for r in await c.fetch(derived)), kept
        rows = await c.fetch(
            "SELECT event_id, organization_id, tokens_deducted, kind, seq FROM ai_token_usage_log"
        )
        snaps = await c.fetch(
            "SELECT organization_id, token_type, balance, extra,"
            " total_allocated, used, period, seq, refresh_date FROM ai_tokens"
        )
        daily = await c.fetch(
            "SELECT organization_id, day, feature, user_id, token_type,"
            " requests, tokens FROM usage_daily"
        )
        orgs = await c.fetch("SELECT id, plan FROM organizations")
    return {
        "rows": sorted(tuple(r) for r in rows),
        "snapshots": {(r[0], r[1]): tuple(r[2:]) for r in snaps},
        "daily": {tuple(r[:4]): tuple(r[4:]) for r in daily},
        "orgs": {r[0]: r[1] for r in orgs},
    }


def expected_snapshots(events: list[dict[str, str]]) -> dict[tuple[str, str], tuple[Any, ...]]:
    last: dict[tuple[str, str], dict[str, str]] = {}
    for e in events:
        key = (e["o"], e["b"])
        if e["s"] and (key not in last or int(e["s"]) > int(last[key]["s"])):
            last[key] = e
    refresh = datetime(2026, 12, 1, tzinfo=UTC)
    return {
        k: (int(e["bal"]), int(e["x"]), int(e["a"]), int(e["used"]), e["per"], int(e["s"]), refresh)
        for k, e in last.items()
    }


def expected_daily(events: list[dict[str, str]]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    acc: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: ["", 0, 0])
    for e in events:
        if e["k"] in ("charge", "refund", "expired_hold"):
            day = datetime.fromtimestamp(int(e["ts"]) / 1000, UTC).date()
            cell = acc[(e["o"], day, e["f"], e["u"])]
            cell[0], cell[1], cell[2] = e["b"], cell[1] + 1, cell[2] + int(e["t"])
    return {k: tuple(v) for k, v in acc.items()}


async def pending_count(redis: Any, ks: KeySpace, group: str = "creditgate-sync") -> int:
    total = 0
    for shard in ks.all_shards():
        if not await redis.exists(shard.events):
            continue
        try:
            total += (await redis.xpending(shard.events, group))["pending"]
        except redis_exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):  # no worker has created the group yet
                raise
    return total


# -- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("decode_responses", [True, False])
async def test_events_become_rows_snapshots_and_rollups_exactly_once(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, decode_responses: bool
) -> None:
    client = redis if decode_responses else Redis.from_url(redis_url())
    events = scenario(["acme", "globex", "initech"], 120)
    n = await xadd_all(redis, keyspace, events)
    w = worker(client, pool, keyspace)

    result = await w.run_once()
    assert (result.read, result.inserted, result.acked) == (n, n, n)
    got = await ledger(pool)
    assert len(got["rows"]) == n
    sums: dict[str, int] = defaultdict(int)
    for e in events:
        sums[e["o"]] += int(e["t"])
    got_sums: dict[str, int] = defaultdict(int)
    for _, org, tokens, _, _ in got["rows"]:
        got_sums[org] += tokens
    assert got_sums == sums
    assert got["snapshots"] == expected_snapshots(events)
    assert got["daily"] == expected_daily(events)
    assert len({k[1] for k in got["daily"]}) == 2  # the requests cross midnight UTC
    assert got["orgs"] == {"acme": "pro", "globex": "pro", "initech": "pro"}
    assert await pending_count(redis, keyspace) == 0

    # A second pass finds nothing and changes nothing.
    again = await w.run_once()
    assert again.read == 0
    assert await ledger(pool) == got

    # Redelivery of every entry (same event ids, new stream entries): no new rows, and the
    # rollups are not doubled.
    await xadd_all(redis, keyspace, events)
    redelivered = await w.run_once()
    assert (redelivered.read, redelivered.inserted, redelivered.duplicates) == (n, 0, n)
    assert await ledger(pool) == got
    if not decode_responses:
        await client.aclose()


async def test_stream_is_trimmed_only_below_what_is_committed(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    org = "acme"
    stream = keyspace.shard(org).events
    events = scenario([org], 300)
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace, batch_size=10_000, claim_idle_ms=60_000)
    await w.run_once()
    # Everything was committed: whole stream nodes (100 entries each) are gone.
    assert await redis.xlen(stream) < 100
    # Another consumer of the group takes 10 entries and never acks them.
    await xadd_all(redis, keyspace, scenario([org], 10, seed=9))
    await redis.xreadgroup("creditgate-sync", "stuck", {stream: ">"}, count=10)
    await xadd_all(redis, keyspace, scenario([org], 3000, seed=10))
    result = await w.run_once()
    assert result.inserted == 6 + 3006  # all but the stuck 10
    pending = await redis.xpending(stream, "creditgate-sync")
    assert pending["pending"] == 10
    first = (await redis.xrange(stream, count=1))[0][0]
    assert tuple(map(int, first.split("-"))) <= tuple(map(int, pending["min"].split("-")))
    assert await redis.xlen(stream) >= 3022  # nothing at or after the stuck entries went


async def test_snapshot_only_moves_forward(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    org = "acme"
    w = worker(redis, pool, keyspace)
    e5 = event(org, "charge", t=5, bal=10, x=3, a=60, used=50, s=5, f="lead_generation")
    e3 = event(org, "charge", t=5, bal=15, x=3, a=60, used=45, s=3, f="lead_generation")
    await xadd_all(redis, keyspace, [e5])
    await w.run_once()
    await xadd_all(redis, keyspace, [e3])
    await w.run_once()
    snap = (await ledger(pool))["snapshots"][(org, "lead_generation")]
    assert snap[:6] == (10, 3, 60, 50, "2026-11", 5)

    # Within one batch, out of order: the highest seq wins; empty fields mean "unchanged".
    e7 = event(org, "grant", t=-20, bal="", x=23, a="", used="", s=7)
    e6 = event(org, "charge", t=1, bal=9, x=3, a=60, used=51, s=6, f="lead_generation")
    e9_no_fields = event(org, "plan_change", b="", s="", bal="", x="", a="", used="", per="")
    await xadd_all(redis, keyspace, [e7, e6, e9_no_fields])
    await w.run_once()
    got = await ledger(pool)
    assert got["snapshots"][(org, "lead_generation")][:6] == (9, 23, 60, 51, "2026-11", 7)
    assert len(got["snapshots"]) == 1  # the plan change without a bucket moved nothing
    assert len(got["rows"]) == 5


async def test_org_row_removed_behind_the_workers_back_is_recreated(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    w = worker(redis, pool, keyspace)
    await xadd_all(redis, keyspace, [event("acme", "grant", t=-5, bal=0, x=5, a=0, used=0, s=1)])
    await w.run_once()
    async with pool.acquire() as c:
        await c.execute("DELETE FROM ai_tokens; DELETE FROM organizations")
    # The writer remembers acme as existing; the new bucket's row then violates the FK,
    # which makes it forget and create the org again.
    later = event("acme", "grant", b="goal_generation", t=-2, bal=0, x=2, a=0, used=0, s=2)
    await xadd_all(redis, keyspace, [later])
    result = await w.run_once()
    assert (result.inserted, result.dead_lettered) == (1, 0)
    got = await ledger(pool)
    assert got["orgs"] == {"acme": "pro"}
    assert got["snapshots"][("acme", "goal_generation")][:6] == (0, 2, 0, 0, "2026-11", 2)


async def test_two_workers_at_once_write_each_row_once(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    events = scenario([f"org{i}" for i in range(12)], 150)
    n = await xadd_all(redis, keyspace, events)
    # Some entries are delivered twice on purpose (same event id in two entries).
    await xadd_all(redis, keyspace, events[::7])
    # Without shard ownership (lease_ms=0) both read every shard at once: the safety net
    # under ownership (the shard's advisory lock, the idempotent insert) is what keeps
    # each row single here. Workers that own their shards: tests/sync/test_shard_ownership.py.
    workers = [
        worker(redis, pool, keyspace, batch_size=40, consumer=f"w{i}", claim_idle_ms=1, lease_ms=0)
        for i in range(2)
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = await ledger(pool)
            if len(got["rows"]) >= n and await pending_count(redis, keyspace) == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
    got = await ledger(pool)
    assert len(got["rows"]) == n
    assert got["daily"] == expected_daily(events)
    assert got["snapshots"] == expected_snapshots(events)
    assert all(w.totals.read > 0 for w in workers)  # both took part
    # A clean stop leaves no consumer behind.
    consumers = await redis.xinfo_consumers(keyspace.shard("org0").events, "creditgate-sync")
    assert [c["name"] for c in consumers] == []


async def test_malformed_entries_are_dead_lettered_and_the_rest_synced(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    org = "acme"
    good = scenario([org], 40)
    bad = [
        event(org, "bogus_kind", s=1),  # decode: unknown kind
        event(org, "charge", t="not-a-number", s=2),  # decode: bad integer
        event(org, "charge", t=1, bal=-5, x=0, a=0, used=0, s=999),  # ledger: CHECK violation
        event("x" * 300, "charge", t=1, s=1),  # ledger: org id too long
        event(org, "charge", t=1, u="nul\x00byte", s=3),  # ledger: text cannot hold NUL
    ]
    mixed = good[:20] + bad + good[20:]
    await xadd_all(redis, keyspace, mixed)
    w = worker(redis, pool, keyspace, batch_size=5000)
    result = await w.run_once()
    assert result.dead_lettered == len(bad)
    assert result.acked == len(mixed)
    got = await ledger(pool)
    assert len(got["rows"]) == len(good)
    assert got["snapshots"] == expected_snapshots(good)
    dead = [d for sk in keyspace.all_shards() for d in await redis.xrange(sk.events + ":dead")]
    assert len(dead) == len(bad)
    errors = [fields["dead_error"] for _, fields in dead]
    assert sum(e.startswith("decode:") for e in errors) == 2
    assert sum(e.startswith("ledger:") for e in errors) == 3
    assert all(fields["dead_entry"] for _, fields in dead)
    assert await pending_count(redis, keyspace) == 0
    assert (await w.stats()).totals.dead_lettered == len(bad)


async def test_failed_pass_leaves_entries_pending_and_rereads_them(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = scenario(["acme", "globex"], 50)
    n = await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace, claim_idle_ms=3_600_000)
    real_write = w._writer.write
    failures = {"left": 3}

    async def flaky(batch: Any, **kw: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionRefusedError("postgres is down (simulated)")
        return await real_write(batch, **kw)

    monkeypatch.setattr(w._writer, "write", flaky)
    with pytest.raises(ConnectionRefusedError):
        await w.run_once()
    assert len((await ledger(pool))["rows"]) == 0
    assert await pending_count(redis, keyspace) > 0
    assert (await w.stats()).last_error is not None

    # run() backs off through the remaining failures and then syncs everything, re-reading
    # its own pending entries (no claim: claim_idle_ms is an hour).
    task = asyncio.create_task(w.run())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if len((await ledger(pool))["rows"]) == n:
            break
        await asyncio.sleep(0.05)
    w.stop()
    await task
    assert len((await ledger(pool))["rows"]) == n
    assert await pending_count(redis, keyspace) == 0
    stats = await w.stats()
    assert stats.last_error is None and stats.last_success_at is not None


async def test_idle_entries_of_a_dead_consumer_are_claimed(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    events = scenario(["acme", "globex", "initech"], 30)
    n = await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace, claim_idle_ms=50)
    await w.run_once()  # creates the groups; takes everything
    await xadd_all(redis, keyspace, scenario(["acme"], 20, seed=3))
    stream = keyspace.shard("acme").events
    taken = await redis.xreadgroup("creditgate-sync", "crashed", {stream: ">"}, count=1000)
    assert len(taken[0][1]) == 26
    await asyncio.sleep(0.1)
    result = await w.run_once()
    assert result.claimed == 26 and result.inserted == 26
    assert len((await ledger(pool))["rows"]) == n + 26
    assert await pending_count(redis, keyspace) == 0


async def test_stats_report_backlog_and_age(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    w = worker(redis, pool, keyspace)
    empty = await w.stats()
    assert empty.backlog == 0 and empty.oldest_unsynced_age_ms is None
    events = scenario(["acme", "globex"], 10)
    n = await xadd_all(redis, keyspace, events)
    await asyncio.sleep(0.05)
    before = await w.stats()
    assert before.backlog == n
    assert before.oldest_unsynced_age_ms is not None and before.oldest_unsynced_age_ms >= 50
    await w.run_once()
    after = await w.stats()
    assert after.backlog == 0 and after.oldest_unsynced_age_ms is None
    assert after.totals.inserted == n


async def test_expired_hold_is_swept_into_a_row(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    org, rid = "acme", uuid.uuid4().hex
    shard = keyspace.shard(org)
    now = int(time.time() * 1000)
    # A hold as lua/charge.lua records it, left behind by a gateway that crashed.
    hold = {
        "o": org,
        "u": "alice",
        "f": "lead_generation",
        "b": "lead_generation",
        "c": 5,
        "pp": 5,
        "lt": [],
        "per": "2026-11",
        "rq": rid,
        "t0": now - 60_000,
        "m": "POST",
        "r": "/api/v1/leads/generate",
        "ik": "",
        "p": "pro",
    }
    live = dict(hold, rq="live")
    await redis.hset(shard.holds, mapping={rid: json.dumps(hold), "live": json.dumps(live)})
    await redis.zadd(shard.holdexp, {rid: now - 1000, "live": now + 600_000})
    w = worker(redis, pool, keyspace, sweep_every_s=3600)
    result = await w.run_once()
    assert result.swept == 1 and result.inserted == 1
    async with pool.acquire() as c:
        row = await c.fetchrow("SELECT * FROM ai_token_usage_log")
    assert row["event_id"] == rid and row["kind"] == "expired_hold"
    assert (row["tokens_deducted"], row["user_id"], row["feature_used"]) == (
        5,
        "alice",
        "lead_generation",
    )
    assert row["latency_ms"] >= 60_000
    got = await ledger(pool)
    assert list(got["daily"].values()) == [("lead_generation", 1, 5)]
    assert got["snapshots"] == {}  # no seq: an expired hold does not move a snapshot
    assert await redis.hexists(shard.holds, "live")


async def wait_rows(pool: asyncpg.Pool, n: int, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if len((await ledger(pool))["rows"]) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} rows after {within} s")


async def test_poll_loop_trims_at_low_rates_and_survives_lost_streams(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    w = worker(redis, pool, keyspace, block_ms=50)
    task = asyncio.create_task(w.run())
    try:
        stream = keyspace.shard("acme").events
        first = scenario(["acme"], 150)
        for chunk in range(0, len(first), 20):  # a trickle, read by the blocking path
            await xadd_all(redis, keyspace, first[chunk : chunk + 20])
            await asyncio.sleep(0.02)
        await wait_rows(pool, len(first))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if await redis.xlen(stream) < 100:
                break
            await asyncio.sleep(0.1)
        assert await redis.xlen(stream) < 100  # trimmed although every read was small

        # Redis loses the streams (and so the consumer groups): the worker recreates them.
        for shard in keyspace.all_shards():
            await redis.delete(shard.events)
        second = scenario(["acme", "globex"], 20, seed=5)
        await xadd_all(redis, keyspace, second)
        await wait_rows(pool, len(first) + len(second))
    finally:
        w.stop()
        await task
    assert len((await ledger(pool))["rows"]) == len(first) + len(second)


async def test_worker_runs_on_fakeredis(pool: asyncpg.Pool) -> None:
    """memory:// (the embedded demo) gives the worker a fakeredis client."""
    client = connect_redis(f"memory://{uuid.uuid4().hex}").client
    ks = KeySpace("cg", 4)
    events = scenario(["acme", "globex"], 30)
    await xadd_all(client, ks, events)
    w = worker(client, pool, ks)
    result = await w.run_once()
    assert result.inserted == len(events)
    assert (await w.stats()).backlog == 0
    task = asyncio.create_task(w.run())
    more = scenario(["initech"], 10)
    await xadd_all(client, ks, more)
    await wait_rows(pool, len(events) + len(more))
    w.stop()
    await task
    got = await ledger(pool)
    assert got["snapshots"] == expected_snapshots(events + more)


async def test_a_broken_hold_does_not_stop_the_sync(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    shard = keyspace.shard("acme")
    await redis.hset(shard.holds, "bad", "{not json")
    await redis.zadd(shard.holdexp, {"bad": 1})
    events = scenario(["acme"], 10)
    await xadd_all(redis, keyspace, events)
    result = await worker(redis, pool, keyspace).run_once()
    assert result.inserted == len(events)
    assert any("sweep_holds failed" in r.getMessage() for r in caplog.records)


async def test_a_backlog_past_max_batches_per_pass_strands_nothing(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    """A shard with more than ``max_batches_per_pass`` batches waiting: the batch read
    when the pass's quota runs out is written too, not left pending (a pending entry
    whose own_pending was cleared waited claim_idle_ms to be claimed back)."""
    events = scenario(["acme"], 120)  # one shard, ~126 entries: many batches of 10
    n = await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace, batch_size=10, max_batches_per_pass=2)
    for _ in range(40):
        if (await w.run_once()).read == 0:
            break
    assert await pending_count(redis, keyspace) == 0
    assert len((await ledger(pool))["rows"]) == n

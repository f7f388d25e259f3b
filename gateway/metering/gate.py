"""``CreditGate``: one deployment's components wired together, and the library API.

The library calls are the seed spec's functions: ``check`` (hasEnoughTokens), ``charge``
(deductTokens), ``balance`` (getTokenBalance); ``reserve``, ``settle`` and ``release`` for
costs known only after the call (contract A9); the admin calls (plans, grants, keys) are
what the CLI and the admin API use. The ASGI middleware and the proxy are built on the
same object, so every way of running creditgate meters the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from gateway.config import Config, load_config
from gateway.core.anchors import format_anchor, local_date, parse_anchor
from gateway.core.balances import Balance, BucketBalance
from gateway.core.counters import METRICS, HotMetrics
from gateway.core.errors import DatabaseUnavailable, LedgerUnavailable, NoDatabase, RedisUnavailable
from gateway.core.ids import check_id
from gateway.core.periods import Clock, SystemClock
from gateway.core.redis_keys import KeySpace
from gateway.identity.identifier import Identifier
from gateway.ledger.levels import LevelStore
from gateway.ledger.store import ApiKeyRow, GrantRow, OrgSnapshot, Store
from gateway.ledger.usage import org_stats
from gateway.ledger.usage_groups import Group
from gateway.metering.levels import Levels, level_fields
from gateway.metering.meter import Actual, Admission, Meter
from gateway.metering.reservations import Reservation, Reservations, SettleResult
from gateway.redisio.connect import RedisHandles, connect_redis
from gateway.redisio.lua_scripts import load
from gateway.routing.router import Router

log = logging.getLogger("creditgate")

# What a lost or refused Postgres connection looks like from asyncpg.
_PG_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)


@dataclass(slots=True)
class CheckResult:
    """Would a call be allowed now, and why not (``POST /check``)."""

    allowed: bool
    code: str | None  # None, feature_not_in_plan or insufficient_tokens
    feature: str
    cost: int
    bucket: str
    balance: int
    refresh_at_ms: int


def _lots_total(raw: str | None, now: int) -> int:
    if not raw:
        return 0
    return sum(int(lot[2]) for lot in json.loads(raw) if lot[1] == 0 or lot[1] > now)


class _LazyStore:
    """Gives the identity layer the store without forcing a connection at construction."""

    def __init__(self, gate: CreditGate) -> None:
        self._gate = gate

    async def lookup_api_key(self, key_hash: bytes) -> ApiKeyRow | None:
        store = await self._gate.store()
        return None if store is None else await store.lookup_api_key(key_hash)

    async def revoke_api_key(self, key_id: str) -> ApiKeyRow | None:
        store = await self._gate.store()
        return None if store is None else await store.revoke_api_key(key_id)


class SyncReporter(Protocol):
    """A sync job running in this process, as ``/metrics`` and ``/readyz`` read it:
    ``sync.worker.SyncWorker`` (structurally: metering does not import the sync layer)."""

    @property
    def totals(self) -> Any:
        """What it did since it started (a ``sync.results.SyncPassResult``)."""
        ...

    async def stats(self) -> Any:
        """Its lag and health (a ``sync.results.SyncStats``); reads Redis."""
        ...


class CreditGate:
    """A creditgate deployment: config, Redis, the ledger store, router, identity and meter.

    ``counters`` are the hot-path counters its requests bump and ``/metrics`` reports
    (default: the process's, :data:`gateway.core.counters.METRICS`). ``sync_worker`` is
    the sync job running in this process, if any: whoever starts one sets it (the server,
    ``gateway.http.lifespan``) so that ``/metrics`` and ``/readyz`` report its progress.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        redis: RedisHandles | None = None,
        store: Store | None = None,
        counters: HotMetrics | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.redis = redis or connect_redis(config.redis_url, timeout=config.redis_timeout_seconds)
        self.keys = KeySpace(config.key_prefix, config.shards)
        self.router = Router(config)
        self.counters = METRICS if counters is None else counters
        self.sync_worker: SyncReporter | None = None
        self._store = store
        self._store_lock: asyncio.Lock | None = None
        self.meter = Meter(
            config, self.redis, now_ms=self.clock.now_ms, seeder=self._seed_from_ledger,
            counters=self.counters, keys=self.keys,
        )  # fmt: skip
        self.identifier = Identifier(
            config.identity, keyspace=self.keys, redis=self.redis.client, store=_LazyStore(self)
        )
        self.reservations = Reservations(config, self.meter)
        self.levels = Levels(config, self.redis, self.keys, seed=self.meter.seed)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | Config, **kwargs: Any) -> CreditGate:
        """Build a gate from a config file path (or an already loaded Config)."""
        config = path if isinstance(path, Config) else load_config(Path(path))
        return cls(config, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------

    async def store(self) -> Store | None:
        """The ledger store, connected on first use; None when no database is configured."""
        if self._store is not None or not self.config.database_url:
            return self._store
        if self._store_lock is None:
            self._store_lock = asyncio.Lock()
        async with self._store_lock:
            if self._store is None:
                try:
                    self._store = await Store.connect(self.config.database_url)
                except (DatabaseUnavailable, OSError, TimeoutError) as exc:
                    raise LedgerUnavailable(str(exc)) from exc
        return self._store

    async def require_store(self) -> Store:
        """The store, or NoDatabase when the config has none."""
        store = await self.store()
        if store is None:
            raise NoDatabase("this needs a database: set database_url in the config")
        return store

    async def close(self) -> None:
        """Settle what is queued and release connections."""
        await self.meter.drain()
        await self.meter.settlement.close()
        if self._store is not None:
            await self._store.close()
            self._store = None
        await self.redis.close()

    # -- seeding -----------------------------------------------------------------------

    async def _seed_from_ledger(self, org: str) -> None:
        store = await self.store()
        snapshot: OrgSnapshot | None = None
        if store is not None:
            try:
                snapshot = await store.org_snapshot(org)
            except _PG_DOWN as exc:
                # Without the ledger we cannot know the org's balance: refuse (503) rather
                # than hand out a fresh allocation.
                raise LedgerUnavailable(f"cannot seed org {org!r}: {exc}") from exc
        if snapshot is None:
            await self.meter.seed_state(org, self.config.default_plan, 0, [])
            return
        assert store is not None
        try:
            levels = level_fields(self.levels, await LevelStore(store.pool).org_levels(org))
        except _PG_DOWN as exc:
            raise LedgerUnavailable(f"cannot seed org {org!r}: {exc}") from exc
        buckets = [
            (
                b.bucket, b.balance, b.allocated, b.used, b.period, b.extra,
                json.dumps([[lot.reference, lot.expires_ms, lot.amount] for lot in b.lots]),
            )
            for b in snapshot.buckets.values()
        ]  # fmt: skip
        seeded = await self.meter.seed_state(
            org, snapshot.plan or self.config.default_plan, snapshot.seq, buckets, levels,
            snapshot.anchor,
        )  # fmt: skip
        if seeded:
            log.info("seeded org %s from the ledger (seq %d)", org, snapshot.seq)

    async def _ensure_state(self, org: str) -> dict[str, str]:
        key = self.keys.org(org)
        try:
            raw = await self.redis.client.hgetall(key)
        except Exception as exc:  # redis-py raises many types; all mean "unavailable" here
            raise RedisUnavailable(str(exc)) from exc
        if not raw:
            await self.meter.seed(org)
            raw = await self.redis.client.hgetall(key)
        return {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }

    # -- library API -------------------------------------------------------------------

    async def balance(self, org: str) -> Balance:
        """The org's plan, period and every bucket's balance (getTokenBalance)."""
        check_id(org)
        state = await self._ensure_state(org)
        now = self.clock.now_ms()
        pid, start, end = self.meter.period_of(state.get("pa", ""), now)  # contract A12
        plan = state.get("plan", self.config.default_plan)
        result = Balance(org, plan, pid, start, end)
        for bucket in self.config.buckets:
            alloc = self.config.allocation(plan, bucket)
            extra = _lots_total(state.get(f"l:{bucket}"), now)
            if state.get(f"p:{bucket}") == pid:
                bal, used = int(state.get(f"b:{bucket}", 0)), int(state.get(f"u:{bucket}", 0))
                allocated = int(state.get(f"a:{bucket}", alloc or 0))
            else:  # the lazy reset has not happened yet: show what it will give
                bal, used, allocated = alloc or 0, 0, alloc or 0
            result.buckets[bucket] = BucketBalance(
                bucket, allocated, bal, extra, used, alloc is not None
            )
        for name, feature in self.config.features.items():
            bucket = self.config.bucket_of(name)
            result.features[name] = {
                "cost": feature.cost,
                "bucket": bucket,
                "allowed": self.config.allocation(plan, bucket) is not None,
            }
        return result

    async def check(self, org: str, feature: str, *, quantity: int = 1) -> CheckResult:
        """Would ``feature`` be allowed for ``org`` now (hasEnoughTokens)? Reads only."""
        check_id(org)
        if feature not in self.config.features:
            raise KeyError(f"unknown feature {feature!r}")
        bal = await self.balance(org)
        bucket = self.config.bucket_of(feature)
        cost = self.config.features[feature].cost * quantity
        b = bal.buckets[bucket]
        if not b.in_plan:
            code: str | None = "feature_not_in_plan"
        elif b.available < cost:
            code = "insufficient_tokens"
        else:
            code = None
        return CheckResult(
            code is None, code, feature, cost, bucket, b.available, bal.period_end_ms
        )

    async def charge(
        self,
        org: str,
        feature: str,
        *,
        user: str | None = None,
        quantity: int = 1,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        key_id: str | None = None,
        team: str | None = None,
    ) -> Admission:
        """Take the tokens for one call now (deductTokens): admit and settle as a charge.

        Returns the Admission; ``.ok`` tells whether the tokens were taken, ``.status``
        why not. A replayed ``idempotency_key`` charges nothing and reports ``replay``;
        the key used before for another feature, quantity or user reports ``reused``.
        An org or user id that breaks the id rule (gateway.core.ids) raises InvalidId.
        ``key_id`` and ``team`` name the call's levels inside the org (contract A10).
        """
        check_id(org)
        if user is not None:
            check_id(user, "user")
        if feature not in self.config.features:
            raise KeyError(f"unknown feature {feature!r}")
        if quantity < 1:
            raise ValueError("quantity must be at least 1")
        fingerprint = None
        if idempotency_key:
            what = f"deduct\0{feature}\0{quantity}\0{user or ''}"
            fingerprint = hashlib.sha256(what.encode("utf-8", "surrogateescape")).hexdigest()
        adm = await self.meter.admit(
            org, feature, user=user, quantity=quantity,
            idempotency_key=idempotency_key, request_id=request_id, method="", route="deduct",
            fingerprint=fingerprint, key_id=key_id, team=team,
        )  # fmt: skip
        if adm.ok:
            await self.meter.settle(
                adm, ok=True, status=None, latency_ms=None, idempotency_key=idempotency_key
            )
        return adm

    async def reserve(
        self,
        org: str,
        feature: str,
        *,
        estimate: int | None = None,
        user: str | None = None,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        """Hold tokens for a call whose cost is known only after it (contract A9).

        ``estimate`` defaults to the feature's reserve (its hold), and is capped by the
        feature's max; ``ttl_seconds`` (default ``hold_ttl_seconds``, at most a day) is how
        long it may stay open before it is charged its reserve. Raises
        ``ReservationRefused`` (with the Admission: not in plan, rate limited, not
        enough tokens, Idempotency-Key in flight or reused) when it cannot be held. See
        gateway.metering.reservations.
        """
        check_id(org)
        if user is not None:
            check_id(user, "user")
        return await self.reservations.reserve(
            org, feature, estimate=estimate, user=user, ttl_seconds=ttl_seconds,
            idempotency_key=idempotency_key,
        )  # fmt: skip

    async def settle(
        self,
        reservation: Reservation | str,
        actual: int | Actual,
        *,
        org: str | None = None,
    ) -> SettleResult:
        """Charge a reservation's actual cost: less than the reserve refunds the rest, more
        takes the difference from what is left and records what cannot be covered as
        overage. A repeat returns the first result. ``reservation`` is a Reservation or
        its id (then ``org`` names its org); ``ReservationNotFound`` for an id that is
        not the org's."""
        org, rid = self._reservation_of(reservation, org)
        return await self.reservations.settle(org, rid, actual)

    async def release(
        self, reservation: Reservation | str, *, org: str | None = None
    ) -> SettleResult:
        """Give a reservation's whole reserve back (a repeat returns the first result)."""
        org, rid = self._reservation_of(reservation, org)
        return await self.reservations.release(org, rid)

    @staticmethod
    def _reservation_of(reservation: Reservation | str, org: str | None) -> tuple[str, str]:
        if isinstance(reservation, Reservation):
            if org is not None and org != reservation.org:
                raise ValueError("org differs from the reservation's")
            return reservation.org, reservation.id
        if org is None:
            raise ValueError("settling a reservation by its id needs its org")
        check_id(org)
        return org, reservation

    async def stats(
        self, org: str, *, days: int = 30, group: Group | None = None
    ) -> dict[str, Any]:
        """Usage by feature, user and day, and a forecast per bucket (getTokenStats);
        ``group`` (team or user) adds usage per team or user (contract A10).

        Read from the ledger (rollups, and the log for groups), so it includes what the
        sync job has written.
        """
        check_id(org)
        store = await self.require_store()
        return await org_stats(
            store.pool, org, self.balance(org), self.clock.now_ms(), days=days, group=group
        )

    # -- admin -------------------------------------------------------------------------

    def _check_plan(self, plan: str) -> None:
        if plan not in self.config.plans:
            raise ValueError(f"unknown plan {plan!r} (known: {', '.join(self.config.plans)})")

    async def set_plan(self, org: str, plan: str) -> str | None:
        """Create ``org`` or change its plan at once (A5); returns the previous plan.

        Redis first (the balance moves by the allocation difference and the ledger gets a
        plan_change row), then the organizations table.
        """
        check_id(org)
        self._check_plan(plan)
        allocations = {
            b: {p: a for p in self.config.plans if (a := self.config.allocation(p, b)) is not None}
            for b in self.config.buckets
        }
        keys = [self.keys.org(org), self.keys.shard(org).events]
        op = uuid.uuid4().hex
        seeded = False
        while True:
            # Proration compares each bucket's period with the org's own (contract A12):
            # its anchor is read from its state, seeded first when missing.
            now = self.clock.now_ms()
            pid, _, _ = self.meter.period_of(await self.period_anchor(org), now)
            args: list[str | int] = [now, pid, plan, op, org, json.dumps(allocations)]
            reply = await self.redis.runner.run(load("set_plan"), keys, args)
            if (reply[0].decode() if isinstance(reply[0], bytes) else reply[0]) != "missing":
                break
            if seeded:
                raise RedisUnavailable(f"state of org {org!r} vanished while seeding")
            await self.meter.seed(org)
            seeded = True
        old: str | None = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        store = await self.store()
        if store is not None:
            # The organizations table knows whether the org is new (None).
            old = await store.set_plan(org, plan)
        created = old is None if store is not None else seeded
        if created and self.config.calendar.anchor == "created":
            # contract A12: an org created on purpose starts its periods that day.
            await self.set_period_anchor(org, local_date(now, self.config.calendar.zone).day)
        return old

    async def period_anchor(self, org: str) -> str:
        """The org's period anchor as its Redis state holds it ("" = none or no state)."""
        if not self.config.calendar.anchored:
            return ""
        try:
            raw = await self.redis.client.hget(self.keys.org(org), "pa")
        except Exception as exc:  # redis-py raises many types; all mean "unavailable" here
            raise RedisUnavailable(str(exc)) from exc
        return "" if raw is None else (raw.decode() if isinstance(raw, bytes) else str(raw))

    async def set_period_anchor(self, org: str, day: int) -> str:
        """Start ``org``'s periods on ``day`` of each month (contract A12); returns the
        anchor (``"<day>:<since>"``). Another day starts a new period today, ending on the
        next anchor day (the bucket resets lazily on the next charge); the org's own day
        again changes nothing, so a renewal's webhook is a no-op. Postgres first (the
        seed's source), then the org's Redis hash, which every process's next charge
        reads (lua/charge.lua answers ``anchor``).

        ``ValueError`` when the config's period is not anchored or ``day`` is not 1-31.
        """
        check_id(org)
        cal = self.config.calendar
        if not cal.anchored:
            raise ValueError(
                "period anchors need period.anchor subscription or created in the config"
            )
        if not 1 <= day <= 31:
            raise ValueError(f"an anchor day is 1-31, got {day}")
        await self._ensure_state(org)
        current = await self.period_anchor(org)
        parsed = parse_anchor(current)
        if parsed is not None and parsed[0] == day:
            return current
        now = self.clock.now_ms()
        since = local_date(now, cal.zone)
        anchor = format_anchor(day, since)
        store = await self.store()
        if store is not None:
            try:
                plan = (await self._ensure_state(org)).get("plan", self.config.default_plan)
                await store.set_period_anchor(org, day, since, plan)
            except _PG_DOWN as exc:
                raise LedgerUnavailable(f"cannot set the anchor of org {org!r}: {exc}") from exc
        await self.redis.runner.run(load("set_anchor"), [self.keys.org(org)], [anchor])
        # This process learns it now; the others from their next charge of the org.
        self.meter.admission.args.set_anchor(org, anchor)
        return anchor

    async def grant(
        self,
        org: str,
        bucket: str,
        amount: int,
        *,
        reference: str,
        expires_at: datetime | None = None,
    ) -> tuple[GrantRow | None, bool]:
        """Add purchased tokens to a bucket, once per ``reference``; returns (row, created)."""
        check_id(org)
        if bucket not in self.config.buckets:
            raise ValueError(f"unknown bucket {bucket!r} (known: {', '.join(self.config.buckets)})")
        if amount <= 0:
            raise ValueError("amount must be positive")
        row: GrantRow | None = None
        created = True
        store = await self.store()
        if store is not None:
            if await store.get_org(org) is None:
                await store.set_plan(org, self.config.default_plan)
            row, created = await store.record_grant(org, bucket, amount, expires_at, reference)
        expires_ms = 0 if expires_at is None else int(expires_at.astimezone(UTC).timestamp() * 1000)
        keys = [self.keys.org(org), self.keys.shard(org).events]
        args: list[str | int] = [self.clock.now_ms(), org, bucket, amount, expires_ms, reference]
        reply = await self.redis.runner.run(load("grant"), keys, args)
        status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if status == "missing":
            await self.meter.seed(org)
            reply = await self.redis.runner.run(load("grant"), keys, args)
            status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        return row, created and status == "ok"

    async def create_key(
        self, org: str, *, user: str | None = None, name: str = ""
    ) -> tuple[ApiKeyRow, str]:
        """Create an API key for ``org`` (creating the org on the default plan if new)."""
        check_id(org)
        if user is not None:
            check_id(user, "user")
        store = await self.require_store()
        if await store.get_org(org) is None:
            await self.set_plan(org, self.config.default_plan)
        return await store.create_api_key(org, user, name)

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke an API key everywhere within the key cache time (A1, issue: seconds)."""
        await self.require_store()
        return await self.identifier.revoke(key_id)

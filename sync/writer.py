"""The Postgres side of the sync job: write one batch of events in one transaction.

Fast path (new entries): ``COPY`` the batch straight into ``ai_token_usage_log``. A
duplicate event id (a redelivery after a crash between commit and ack) makes the ``COPY``
fail with a unique violation; the transaction rolls back and the batch is written again
on the safe path. Safe path (re-read and claimed entries, which are likely redeliveries,
and fast-path failures): ``COPY`` into a temporary table, then ``INSERT ... ON CONFLICT
(event_id) DO NOTHING RETURNING event_id``. The unique event id turns at-least-once
delivery into exactly-once rows either way.

Either path works the batch with each org's entries together, in stream order within the
org (sync/records.py ``org_order``): the ``COPY`` and the rollup and snapshot rows, whose
indexes all lead with the org, then take an org's rows on the same leaf pages.

In the same transaction, from the rows actually inserted (sync/aggregate.py reduces them
in Python): one statement upserts ``usage_daily_user`` per (org, day, user) and
``usage_daily_feature`` per (org, day, feature) (since migration 0010; triggers did it
before; since 0015 the finer ``usage_daily`` is a view of the ledger, not written), and,
for the events with usage fields, ``usage_daily_model`` one per (org, day, model). The
rows of an (org, day) that has no rollup row yet (an org's first batch of a UTC day, or
of a first start; Postgres is asked for the pairs this writer has not written itself)
are inserted plainly instead of upserted, at about half the cost; should one meet a row
after all (a writer of the org outside the shard's lock), the batch is written again with
the upsert. Missing ``organizations`` rows (an event's org, with its newest event's plan)
are created; without alerts, the ``ai_tokens`` rows of buckets not seen yet are inserted
with the batch's snapshot in them, and one ``UPDATE`` moves every other (org, bucket)
snapshot forward, column by column, only to values with a newer seq; with alerts, new
buckets get seq-0 placeholders first, which the alerting ``UPDATE`` then moves (its "before"
of a new bucket). An ``UPDATE`` re-checks its condition against the newest committed row
version, which keeps this right when two workers touch the same bucket.

The ledger is partitioned by month of ``created_at`` (migration 0010). Before a batch's
transaction, each month its events fall in that this writer has not seen yet gets its
partition, and the month after it too, created if missing in a short transaction of
its own: normally that creates next month's partition weeks ahead, and an event of an
unusual month (a late one, a clock far off) never reaches ``COPY`` without a partition
(which Postgres would reject as a constraint violation, dead-lettering the batch).

Every transaction first takes a transaction-level advisory lock on its shard (on each of
its shards, in shard order, for a batch that folds the entries of several shards: see
sync/worker.py). An org's events all live in one shard, so writers of different shards
never touch the same rollup, snapshot or event rows, and writers of the same shard (two
workers, a claim racing a slow worker) take turns: no deadlocks, without sorting every
batch's keys.

Test hook: the environment variable ``CREDITGATE_SYNC_CRASH`` (``before_commit`` or
``after_commit``, optionally ``:N`` to fire on the N-th batch written by this process)
makes the process SIGKILL itself at that point. It exists for tests/e2e/test_sync_crash.py.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import asyncpg
from asyncpg.exceptions import _base as asyncpg_base
from asyncpg.pool import PoolConnectionProxy

from gateway.alerts.evaluation import AlertDefaults
from sync import sql
from sync.aggregate import (
    MODEL_ROLLUP_WIDTH,
    USER_ROLLUP_WIDTH,
    Columns,
    arm_column,
    model_rollups,
    orgs_of,
    plans,
    rollups,
    snapshots,
    split_rows,
    take,
)
from sync.batch import Rows, first_of_each
from sync.levels import write_cap_alerts
from sync.records import (
    COPY_COLUMNS,
    Times,
    careful_payload,
    fast_payload,
    in_order,
    org_order,
)

log = logging.getLogger("creditgate.sync")

# A connection of the writer's pool, as acquired.
Conn = asyncpg.Connection | PoolConnectionProxy

# Errors caused by the batch's content rather than by the database being unavailable:
# they would fail the same batch forever, so the worker isolates the offending events.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg_base.DataError,
    ValueError,
    OverflowError,
    UnicodeError,
)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one committed batch did."""

    events: int  # events in the batch
    inserted: int  # new ledger rows (the rest were already there: redeliveries)
    rollups: int  # usage_daily_user rows inserted or incremented
    snapshots: int  # ai_tokens rows moved forward
    direct: bool  # written by the fast path (COPY straight into the ledger)
    fallback: bool = False  # the fast path met a duplicate; written by the safe path
    alerts: int = 0  # alert events put in the outbox (gateway/alerts/evaluation.py)


class _RollupRowTaken(Exception):
    """A plain insertion of a fresh (org, day)'s rollup rows met a row (see sql.FRESH_DAYS),
    or of a new org or bucket (sql._INSERT_SNAPSHOTS_PLAIN): the transaction is rolled back
    and the batch is written again with the upserts."""


class _CrashHook:
    """``CREDITGATE_SYNC_CRASH`` (test hook, see the module docstring)."""

    def __init__(self, spec: str | None) -> None:
        self.point, self.on_batch = "", 0
        if spec:
            point, _, nth = spec.partition(":")
            self.point, self.on_batch = point, int(nth or "1")
        self.batches = 0

    def check(self, point: str) -> None:
        if point == self.point and self.batches >= self.on_batch:
            log.warning("CREDITGATE_SYNC_CRASH=%s: killing the process (test hook)", point)
            os.kill(os.getpid(), signal.SIGKILL)


def _call(stmt: tuple[str, list[Any]]) -> list[Any]:
    return [stmt[0], *stmt[1]]


async def _once(data: bytes) -> AsyncIterator[bytes]:
    # COPY data for asyncpg: one chunk (asyncpg would take bytes as a file name).
    yield data


def months_of(days: Iterable[str]) -> set[str]:
    """The months (``YYYY-MM``) of ISO days, each with the month after it: the partitions a
    batch of events of these days needs, and the next one created ahead."""
    out: set[str] = set()
    for month in {day[:7] for day in set(days)}:
        year, mon = int(month[:4]), int(month[5:7])
        nxt = f"{year + 1:04d}-01" if mon == 12 else f"{year:04d}-{mon + 1:02d}"
        out.update((month, nxt))
    return out


def lock_space(prefix: str) -> int:
    """The advisory-lock class of a key prefix (an int4: crc32, signed)."""
    value = zlib.crc32(prefix.encode("utf-8"))
    return value - (1 << 32) if value >= 1 << 31 else value


class BatchWriter:
    """Writes batches of rows to the ledger, one transaction per batch.

    It remembers which orgs and ai_tokens rows it has seen committed, and skips the
    statement that creates missing ones when a batch holds nothing new. The memory is
    dropped every ``known_ttl_s`` seconds, and at once if the ledger proves it wrong (a
    foreign-key violation: the org row is gone).
    """

    # The fewest user rollup rows of a batch for which the writer asks which of its
    # (org, day) pairs are fresh (sync/sql.py FRESH_DAYS): a smaller batch upserts them all.
    FRESH_MIN_ROWS = 256

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        times: Times,
        prefix: str = "cg",
        default_plan: str = "starter",
        known_ttl_s: float = 300.0,
        known_max: int = 1_000_000,
        alerts: AlertDefaults | None = None,
        timezone: str = "UTC",
    ) -> None:
        self._pool = pool
        # The config's period.timezone (contract A12): period ids are local dates, so a
        # snapshot's refresh_date is the period's end at that zone's midnight.
        self._timezone = timezone
        self._times = times
        self._lock_space = lock_space(prefix)
        self._default_plan = default_plan
        self._crash = _CrashHook(os.environ.get("CREDITGATE_SYNC_CRASH"))
        self._known_orgs: set[str] = set()
        self._known_rows: set[tuple[str, str]] = set()
        # (org, day) pairs whose rollup rows this writer has committed: not fresh, so their
        # rows are upserted without asking (sync/sql.py FRESH_DAYS).
        self._known_days: set[tuple[str, str]] = set()
        self._known_ttl_s = known_ttl_s
        self._known_max = known_max
        self._known_since = time.monotonic()
        self._alerts = alerts
        self._months: set[str] = set()  # months whose ledger partition is known to exist
        self.fallbacks = 0  # fast-path batches that met a duplicate and were redone

    def _forget(self) -> None:
        self._known_orgs.clear()
        self._known_rows.clear()
        self._known_days.clear()
        self._known_since = time.monotonic()

    async def write(
        self, rows: Rows, *, shard: int | Sequence[int], direct: bool = True
    ) -> WriteResult:
        """Write ``rows`` (of ``shard``'s stream, or of these shards' streams) in one
        transaction; on return, committed.

        ``direct=False`` skips the fast path (for entries likely written before). Raises
        one of ``DATA_ERRORS`` when the batch's content is rejected (nothing is written),
        or a connection/database error when Postgres is unavailable.
        """
        if not len(rows):
            return WriteResult(0, 0, 0, 0, direct)
        self._crash.batches += 1
        if (
            time.monotonic() - self._known_since > self._known_ttl_s
            or len(self._known_rows) > self._known_max
            or len(self._known_days) > self._known_max
        ):
            self._forget()
        months = months_of(rows.days) - self._months
        if months:
            await self._ensure_partitions(months)
        fallback = False
        fresh = True  # fresh (org, day) rollup rows by plain insertions
        for attempt in range(6):
            try:
                if direct:
                    try:
                        return await self._write_once(rows, shard, direct=True, fresh=fresh)
                    except asyncpg.UniqueViolationError:
                        # Some event is in the ledger already: redo it the safe way.
                        self.fallbacks += 1
                        direct, fallback = False, True
                return await self._write_once(
                    rows, shard, direct=False, fallback=fallback, fresh=fresh
                )
            except _RollupRowTaken:
                # A rollup row appeared after FRESH_DAYS looked (nothing was written):
                # write the batch again, every rollup row upserted.
                fresh = False
            except asyncpg.DeadlockDetectedError:
                # Only when an org's events sit in two shards' streams (the shard count
                # changed) and both are written at once; the batch is idempotent.
                if attempt == 5:
                    raise
                log.info("deadlock writing a batch (attempt %d); retrying", attempt + 1)
            except asyncpg.ForeignKeyViolationError:
                if not self._known_orgs or attempt == 5:
                    raise
                self._forget()  # an org we remembered is gone: create what is missing
        raise AssertionError("unreachable")

    async def _ensure_partitions(self, months: set[str]) -> None:
        """Create the ledger partitions of ``months`` (``YYYY-MM``) that are missing."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(sql.PARTITION_LOCK_TIMEOUT)
            for month in sorted(months):
                created = await conn.fetchval(
                    sql.ENSURE_PARTITION, date.fromisoformat(month + "-01")
                )
                if created:
                    log.info("created ledger partition %s", created)
        self._months.update(months)

    async def _write_rollups(
        self, conn: Conn, roll: Columns, fresh: bool
    ) -> Iterable[tuple[str, str]]:
        """Upsert the batch's user and feature rollup rows; the rows of (org, day) pairs
        without any row yet (asked of Postgres for pairs this writer has not written) are
        inserted plainly instead, unless ``fresh`` is False. Returns the batch's pairs.
        Raises ``_RollupRowTaken`` when such an insertion meets a row after all."""
        days = dict.fromkeys(zip(roll[0], roll[1], strict=True))
        # The question is a statement of its own: worth it only with enough rows riding on
        # the answer (a backlog, a first start), not for a trickle's small batches.
        ask = fresh and len(roll[0]) >= self.FRESH_MIN_ROWS
        unknown = [pair for pair in days if pair not in self._known_days] if ask else []
        found: set[tuple[str, str]] = set()
        if unknown:
            at = await conn.fetch(
                sql.FRESH_DAYS, [p[0] for p in unknown], [date.fromisoformat(p[1]) for p in unknown]
            )
            found = {unknown[r[0] - 1] for r in at}
        if not found:
            await conn.execute(*_call(sql.statement("rollup", roll)))
        elif len(found) == len(days):
            await self._insert_fresh(conn, roll)
        else:
            users = USER_ROLLUP_WIDTH
            new_users, old_users = split_rows(roll[:users], found)
            new_features, old_features = split_rows(roll[users:], found)
            await self._insert_fresh(conn, (*new_users, *new_features))
            if old_users[0]:
                await conn.execute(*_call(sql.statement("rollup", (*old_users, *old_features))))
        return days.keys()

    async def _write_snapshots(
        self,
        conn: Conn,
        snaps: Columns,
        new_orgs: list[str],
        org_plans: dict[str, str | None],
        new_rows: list[tuple[str, str]],
        fresh: bool = True,
    ) -> int:
        """Without alerts: the missing orgs, the rows of buckets not seen yet with their
        snapshot in them (sql._INSERT_SNAPSHOTS; by plain insertions unless ``fresh`` is
        False), then the update of the other rows (of every row, if some bucket thought new
        was there after all). Returns the rows moved. Raises ``_RollupRowTaken`` when a
        plain insertion meets a row another transaction inserted meanwhile."""
        rest: Columns = snaps
        moved = 0
        if new_orgs or new_rows:
            if len(new_rows) == len(snaps[0]):
                new, rest = snaps, ()
            else:
                seen = set(new_rows)
                is_new = [k in seen for k in zip(snaps[0], snaps[1], strict=True)]
                new, rest = take(snaps, is_new, True), take(snaps, is_new, False)
            text, params = sql.statement(
                "insert_snapshots_plain" if fresh else "insert_snapshots", new
            )
            plans_ = [org_plans[o] for o in new_orgs]
            try:
                counts = await conn.fetchrow(text, *params, new_orgs, plans_, self._default_plan)
            except asyncpg.UniqueViolationError as exc:
                if not fresh:
                    raise
                raise _RollupRowTaken from exc
            assert counts is not None
            moved = counts[1]
            if counts[0] < len(new_rows):
                rest = snaps  # a bucket was there: the update moves it (not the new rows)
        if rest and rest[0]:
            status = await conn.execute(*_call(sql.statement("snapshots", rest)))
            moved += int(status.rsplit(" ", 1)[-1])
        return moved

    @staticmethod
    async def _insert_fresh(conn: Conn, roll: Columns) -> None:
        try:
            # A savepoint would cost every batch; a violation redoes the batch instead.
            await conn.execute(*_call(sql.statement("rollup_fresh", roll)))
        except asyncpg.UniqueViolationError as exc:
            raise _RollupRowTaken from exc

    async def _write_once(
        self,
        rows: Rows,
        shard: int | Sequence[int],
        *,
        direct: bool,
        fallback: bool = False,
        fresh: bool = True,
    ) -> WriteResult:
        # Each org's rows together (in stream order): cheaper index insertions.
        order = org_order(rows.flats)
        flats, days = in_order(rows.flats, order), in_order(rows.days, order)
        payload = fast_payload(in_order(rows.lines, order), rows.empty_bucket, rows.clean)
        null: str | None = ""
        if payload is None:
            payload, null = careful_payload(flats, self._times), None
        snaps = snapshots(flats, self._timezone)
        # The plans only for orgs not known yet (in a steady state, none).
        org_plans = plans(rows.flats) if orgs_of(rows.flats) - self._known_orgs else {}
        new_orgs = [o for o in org_plans if o not in self._known_orgs]
        new_rows = [k for k in zip(snaps[0], snaps[1], strict=True) if k not in self._known_rows]
        # On the fast path every row is new, so the rollups can be reduced before the
        # transaction starts; the safe path knows which rows are new only inside it.
        roll = rollups(flats, days) if direct else ()
        # Only batches holding usage fields have model rollups (most hold none).
        no_models = ((),) * MODEL_ROLLUP_WIDTH
        models = model_rollups(flats, days) if direct and rows.usage else no_models
        async with self._pool.acquire() as conn, conn.transaction():
            if isinstance(shard, int):
                await conn.execute(sql.LOCK, self._lock_space, shard)
            else:
                await conn.execute(sql.LOCK_MANY, self._lock_space, list(shard))
            if direct:
                await conn.copy_to_table(
                    sql.LOG, source=_once(payload), columns=COPY_COLUMNS, null=null
                )
                inserted = len(rows)
            else:
                await conn.execute(sql.CREATE_TEMP)
                await conn.copy_to_table(
                    sql.TEMP, source=_once(payload), columns=COPY_COLUMNS, null=null
                )
                ids = {r[0] for r in await conn.fetch(sql.INSERT_FROM_TEMP)}
                inserted = len(ids)
                new_flats, new_days = first_of_each(rows, ids)
                roll = rollups(new_flats, new_days)
                if rows.usage:
                    models = model_rollups(new_flats, new_days)
            pairs = await self._write_rollups(conn, roll, fresh) if roll[0] else ()
            if models[0]:
                await conn.execute(*_call(sql.statement("model_rollup", models)))
            moved = fired = 0
            alerts = self._alerts
            if alerts is None:
                moved = await self._write_snapshots(
                    conn, snaps, new_orgs, org_plans, new_rows, fresh
                )
            elif new_orgs or new_rows:
                # The alerting statement compares each bucket before and after its update:
                # a new bucket's "before" is its seq-0 placeholder.
                await conn.execute(
                    sql.INSERT_ORGS_AND_PLACEHOLDERS,
                    new_orgs,
                    [org_plans[o] for o in new_orgs],
                    self._default_plan,
                    [k[0] for k in new_rows],
                    [k[1] for k in new_rows],
                )
            # With alerts, always the alerting statement: an org's rule may watch its
            # buckets when the config's levels leave `org` out (and the reverse).
            if snaps[0] and alerts is not None:
                # The same update, with the alerts it causes written by the same statement
                # (and so in the same transaction as the ledger rows).
                armed = (*snaps, arm_column(rows.flats, snaps))
                text, params = sql.statement("alert_snapshots", armed)
                counts = await conn.fetchrow(text, *params, *alerts.params())
                assert counts is not None
                moved, fired = counts[0], counts[1]
            if alerts is not None and rows.levels:
                # Team, user and key caps: after the snapshots (payloads read refresh_date).
                fired += await write_cap_alerts(conn, rows.flats, rows.levels, alerts)
            self._crash.check("before_commit")
        self._known_orgs.update(new_orgs)
        self._known_rows.update(new_rows)
        self._known_days.update(pairs)
        self._crash.check("after_commit")
        return WriteResult(
            events=len(rows),
            inserted=inserted,
            rollups=len(roll[0]),
            snapshots=moved,
            direct=direct,
            fallback=fallback,
            alerts=fired,
        )

"""The ledger's monthly partitions (migration 0010): listing them and retention by month.

``ai_token_usage_log`` is partitioned by the UTC month of ``created_at``; each month is a
table ``ai_token_usage_log_pYYYYMM``, created ahead by ``creditgate migrate`` and the sync
job (sync/writer.py). Retention drops whole months (``creditgate ledger prune --before
YYYY-MM``): one catalog operation instead of deleting and vacuuming billions of rows.

What a prune keeps: the daily rollups (usage_daily_user, _feature, _model) are not
touched, so ``/stats``, ``/usage`` by day and the dashboards keep the pruned months'
history; ``creditgate_rebuild_usage_rollups()`` rebuilds only from the oldest month the
ledger still holds. ``usage_daily`` (org, day, feature, user) is a view of the ledger since
migration 0015: before a month is dropped, its per-(org, day, feature, user) sums are
archived in ``usage_daily_pruned`` (``creditgate_archive_usage_month``), which the view
reads for the months the ledger no longer holds. What it loses: the audit rows (``/usage``
pages) of those months. Balances never depend on old rows (``ai_tokens`` holds the snapshots).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

import asyncpg

PARENT = "ai_token_usage_log"
_NAME = re.compile(r"^ai_token_usage_log_p(\d{4})(\d{2})$")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
# Detaching and dropping lock the ledger's parent table: rather than queue every reader
# and the sync job behind a long query, give up and say so.
_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '10s'"


@dataclass(frozen=True, slots=True)
class Partition:
    """One month of the ledger."""

    month: date  # its first day
    name: str
    rows: int | None = None  # counted when dropped

    @property
    def label(self) -> str:
        """The month as ``YYYY-MM``."""
        return f"{self.month.year:04d}-{self.month.month:02d}"


def parse_month(text: str) -> date:
    """``YYYY-MM`` -> the month's first day; ValueError otherwise."""
    m = _MONTH.match(text.strip())
    if not m or not 1 <= int(m[2]) <= 12:
        raise ValueError(f"{text!r} is not a month: expected YYYY-MM, e.g. 2026-01")
    return date(int(m[1]), int(m[2]), 1)


async def partitions(conn: asyncpg.Connection) -> list[Partition]:
    """The ledger's monthly partitions, oldest first."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = $1::regclass AND c.relkind = 'r'",
        PARENT,
    )
    found = []
    for r in rows:
        m = _NAME.match(r["relname"])
        if m:  # anything else attached by hand is not ours to list or drop
            found.append(Partition(date(int(m[1]), int(m[2]), 1), r["relname"]))
    return sorted(found, key=lambda p: p.month)


async def prune(conn: asyncpg.Connection, before: date, today: date) -> list[Partition]:
    """Drop every month of the ledger before ``before`` (a month's first day), in one
    transaction; return them with the rows each held.

    ValueError when ``before`` is after the current month (``today``'s): that would drop a
    month that is not complete, whose events may still be arriving.
    """
    this_month = today.replace(day=1)
    if before.day != 1:
        raise ValueError(f"{before} is not the first day of a month")
    if before > this_month:
        raise ValueError(
            f"{before:%Y-%m} would drop {this_month:%Y-%m}, which is not complete yet (today"
            f" is {today}); the latest allowed is --before {this_month:%Y-%m}"
        )
    dropped = []
    async with conn.transaction():
        await conn.execute(_LOCK_TIMEOUT)
        for part in await partitions(conn):
            if part.month >= before:
                continue
            rows = await conn.fetchval(f'SELECT count(*) FROM "{part.name}"')
            # usage_daily (a view) keeps the month's finest sums: archived, then dropped.
            await conn.execute(
                "SELECT creditgate_archive_usage_month($1::text::regclass)", part.name
            )
            await conn.execute(f'ALTER TABLE {PARENT} DETACH PARTITION "{part.name}"')
            await conn.execute(f'DROP TABLE "{part.name}"')
            dropped.append(Partition(part.month, part.name, rows))
    return dropped

"""Usage of one org grouped by team or by user (``GET /stats?group=team|user``, contract
A10), read from the audit log's ``team_id`` / ``user_id`` columns.

There is no rollup by team (the daily rollups predate teams, and a request's team is what
it was charged as, which a rollup keyed by user could not recover after a user moves), so
this reads the log itself: one index range scan of ``usage_log_org_created`` (org,
created_at) over the window, grouped in Postgres. It counts the same rows as the rollups
(the request kinds: charge, refund, expired_hold; a refund's row carries 0 tokens), so a
group's figures add up to ``by_day``'s over the same window.

Runs inside the caller's :func:`gateway.ledger.org_scope.org_reader` transaction: row-level
security applies, and the query filters by org too.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from gateway.ledger.org_scope import Conn

__all__ = ["GROUPS", "Group", "group_usage"]

Group = Literal["team", "user"]
GROUPS: tuple[Group, ...] = ("team", "user")

# The column per group; a fixed mapping, never interpolated from input.
_COLUMN: dict[Group, str] = {"team": "team_id", "user": "user_id"}

# Kinds of the rows a request leaves (as sync/aggregate.py's REQUEST_KINDS counts them).
_REQUEST_KINDS = ["charge", "refund", "expired_hold"]


async def group_usage(
    conn: Conn, org: str, group: Group, start: date, end: date
) -> list[dict[str, Any]]:
    """Requests and tokens per team (or user) of ``org`` over [start, end] (UTC days),
    most tokens first; ``id`` None gathers the requests without one."""
    column = _COLUMN[group]
    since = datetime.combine(start, time(), UTC)
    until = datetime.combine(end + timedelta(days=1), time(), UTC)
    rows = await conn.fetch(
        f"SELECT nullif({column}, '') AS id, count(*) AS requests,"
        " coalesce(sum(tokens_deducted), 0) AS tokens"
        " FROM ai_token_usage_log"
        " WHERE organization_id = $1 AND created_at >= $2 AND created_at < $3"
        " AND kind = ANY($4::text[])"
        " GROUP BY 1 ORDER BY tokens DESC, requests DESC, id NULLS LAST",
        org,
        since,
        until,
        _REQUEST_KINDS,
    )
    return [
        {"id": r["id"], "requests": int(r["requests"]), "tokens": int(r["tokens"])} for r in rows
    ]

"""The audit trail of one org (``GET /usage``) and its overage over a period
(``GET /balance``), read from ``ai_token_usage_log``.

The log is only read a page at a time, newest first, by keyset over ``(created_at, id)``
(the ``usage_log_org_created`` index, one per monthly partition since 0010: the newest
months are read first and older ones only as far as the page needs). Both reads run in
the org's read-only transaction (gateway.ledger.org_scope).
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from gateway.core.timefmt import iso
from gateway.ledger.org_scope import org_reader

__all__ = ["decode_cursor", "encode_cursor", "period_overage", "usage_page"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

_LOG_COLUMNS = (
    "id, event_id, created_at, kind, feature_used, token_type, user_id, tokens_deducted,"
    " balance_after, extra_after, request_id, method, route, upstream_status, latency_ms,"
    " plan, reference, model, input_tokens, cached_input_tokens, output_tokens,"
    " reasoning_tokens, reserved, overage, cost_source, usage_missing"
)
# Kinds of the rows a request leaves; only these have an actual charge.
_REQUEST_KINDS = frozenset({"charge", "refund", "expired_hold"})


def encode_cursor(created_at: datetime, row_id: int) -> str:
    """An opaque cursor for the row after which the next page starts."""
    micros = (created_at - _EPOCH) // _US
    raw = f"{micros}.{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The (created_at, id) of a cursor; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        micros_s, _, id_s = raw.partition(".")
        if not micros_s.lstrip("-").isdigit() or not id_s.isdigit():
            raise ValueError(cursor)
        when = _EPOCH + int(micros_s) * _US
        row_id = int(id_s)
    except (binascii.Error, UnicodeDecodeError, OverflowError) as exc:
        raise ValueError(cursor) from exc
    if row_id > 2**63 - 1:
        raise ValueError(cursor)
    return when, row_id


def _log_item(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["id"],
        "event_id": r["event_id"],
        "created_at": iso(r["created_at"]),
        "kind": r["kind"],
        "feature": r["feature_used"],
        "bucket": r["token_type"],
        "user_id": r["user_id"],
        "tokens": r["tokens_deducted"],
        "balance_after": r["balance_after"],
        "extra_after": r["extra_after"],
        "request_id": r["request_id"],
        "method": r["method"] or None,
        "route": r["route"] or None,
        "upstream_status": r["upstream_status"],
        "latency_ms": r["latency_ms"],
        "plan": r["plan"] or None,
        "reference": r["reference"] or None,
        # What the call cost (migration 0006): NULL for fixed-cost and older rows.
        "model": r["model"],
        "input_tokens": r["input_tokens"],
        "cached_input_tokens": r["cached_input_tokens"],
        "output_tokens": r["output_tokens"],
        "reasoning_tokens": r["reasoning_tokens"],
        "reserved": r["reserved"],
        "charged": r["tokens_deducted"] + r["overage"] if r["kind"] in _REQUEST_KINDS else None,
        "overage": r["overage"],
        "cost_source": r["cost_source"],
        "usage_missing": r["usage_missing"],
    }


async def usage_page(
    pool: asyncpg.Pool, org: str, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the org's audit rows, newest first, and the cursor of the next page
    (None on the last). ValueError for a cursor that is not one of ours."""
    after = decode_cursor(cursor) if cursor else None
    async with org_reader(pool, org) as conn:
        if after is None:
            rows = await conn.fetch(
                f"SELECT {_LOG_COLUMNS} FROM ai_token_usage_log WHERE organization_id = $1"
                " ORDER BY created_at DESC, id DESC LIMIT $2",
                org, limit + 1,
            )  # fmt: skip
        else:
            rows = await conn.fetch(
                f"SELECT {_LOG_COLUMNS} FROM ai_token_usage_log WHERE organization_id = $1"
                " AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4",
                org, after[0], after[1], limit + 1,
            )  # fmt: skip
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return [_log_item(r) for r in rows], next_cursor


_PERIOD_OVERAGE = """
SELECT token_type, sum(overage) AS overage FROM ai_token_usage_log
WHERE organization_id = $1 AND created_at >= $2 AND created_at < $3 AND overage > 0
GROUP BY token_type
"""


async def period_overage(
    pool: asyncpg.Pool, org: str, start: datetime, end: datetime
) -> dict[str, int]:
    """``org``'s overage per bucket over [start, end) (its period): the tokens its calls
    cost beyond what the balances could cover, from the audit rows (so as of the sync
    lag). Buckets without any are left out. Reads only the rows with overage, through the
    partial index ``usage_log_overage`` (migration 0011)."""
    async with org_reader(pool, org) as conn:
        rows = await conn.fetch(_PERIOD_OVERAGE, org, start, end)
    return {r["token_type"]: int(r["overage"]) for r in rows}

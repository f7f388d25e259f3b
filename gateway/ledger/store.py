"""Postgres data access (asyncpg) for organizations, API keys, grants and balance snapshots.

The store connects as the tables' owner, which row-level security does not restrict; code
that acts for one org through a restricted role sets ``creditgate.org_id`` itself. Every
timestamp is timezone-aware (UTC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from types import TracebackType

import asyncpg

from gateway.core.anchors import format_anchor
from gateway.identity.api_keys import (
    display_prefix,
    generate_api_key,
    hash_api_key,
    looks_like_api_key,
    new_key_id,
)
from gateway.ledger.migrate import guard_connect

__all__ = [
    "ApiKeyRow",
    "BucketSnapshot",
    "GrantConflict",
    "GrantRow",
    "Lot",
    "OrgRow",
    "OrgSnapshot",
    "Store",
    "StoreError",
    "UnknownOrg",
    "hash_api_key",
    "looks_like_api_key",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class StoreError(Exception):
    """Base of the store's own errors."""


class UnknownOrg(StoreError, LookupError):
    """The organization does not exist (create it with ``creditgate orgs set-plan``)."""


class GrantConflict(StoreError):
    """A grant reference was reused for a different bucket or amount."""


@dataclass(frozen=True, slots=True)
class OrgRow:
    """An organization and its current plan."""

    id: str
    plan: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """An API key's metadata (the key itself is never stored)."""

    id: str
    org: str
    user: str | None
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    # The SHA-256 of the key, so a revocation can find the key's cache entries.
    key_hash: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class GrantRow:
    """A purchased top-up of one bucket."""

    id: int
    org: str
    bucket: str
    amount: int
    expires_at: datetime | None
    reference: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Lot:
    """Purchased tokens expiring together: ``expires_ms`` since the epoch, 0 = never."""

    expires_ms: int
    amount: int
    reference: str


@dataclass(frozen=True, slots=True)
class BucketSnapshot:
    """One bucket's state as of the org's snapshot ``seq``."""

    bucket: str
    balance: int
    extra: int
    allocated: int
    used: int
    period: str
    lots: list[Lot] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class OrgSnapshot:
    """An org's durable state, to seed Redis when the org's hash is missing there.

    ``plan`` is None when the org is not in the organizations table; ``seq`` is the highest
    sequence number over its ai_tokens rows (0 when it has none).
    """

    org: str
    plan: str | None
    seq: int
    buckets: dict[str, BucketSnapshot]
    anchor: str = ""  # the org's period anchor (contract A12, gateway/core/anchors.py)


def _ms(when: datetime | None) -> int:
    return 0 if when is None else (when - _EPOCH) // _MS


def _org_row(r: asyncpg.Record) -> OrgRow:
    return OrgRow(r["id"], r["plan"], r["created_at"])


def _key_row(r: asyncpg.Record) -> ApiKeyRow:
    return ApiKeyRow(
        r["id"], r["organization_id"], r["user_id"], r["name"], r["prefix"],
        r["created_at"], r["revoked_at"], bytes(r["key_hash"]),
    )  # fmt: skip


def _grant_row(r: asyncpg.Record) -> GrantRow:
    return GrantRow(
        r["id"], r["organization_id"], r["token_type"], r["amount"], r["expires_at"],
        r["reference"], r["created_at"],
    )  # fmt: skip


def allocate_lots(extra: int, grants: list[GrantRow]) -> list[Lot]:
    """Split a bucket's ``extra`` into lots attributed to its unexpired ``grants``.

    The ledger keeps only the total of purchased tokens left, not each grant's remainder,
    so the most recently created grants are assumed to be the unspent ones: they are taken
    first, each capped at its amount, until the lots add up to ``extra``. Anything left
    over (``extra`` from grants already past their expiry but not yet expired in the
    ledger, or from repairs) becomes a never-expiring lot with an empty reference. The sum
    of the lots is always exactly ``extra``; no token is lost, and doubt is resolved in the
    customer's favour (later expiry). Lots are ordered soonest expiry first, never last.
    """
    lots: list[Lot] = []
    left = extra
    for g in sorted(grants, key=lambda g: (g.created_at, g.id), reverse=True):
        if left <= 0:
            break
        take = min(g.amount, left)
        lots.append(Lot(_ms(g.expires_at), take, g.reference))
        left -= take
    if left > 0:
        lots.append(Lot(0, left, ""))
    lots.sort(key=lambda lot: (lot.expires_ms == 0, lot.expires_ms, lot.reference))
    return lots


class Store:
    """Data access over one asyncpg pool; ``pool`` is public for other components."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> Store:
        """Open a pool; raises gateway.ledger.migrate.DatabaseUnavailable when that fails."""
        pool = await guard_connect(
            dsn, lambda: asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
        )
        return cls(pool)

    async def close(self) -> None:
        """Close the pool (waits for connections in use to be released)."""
        await self.pool.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- organizations -------------------------------------------------------------------

    async def get_org(self, org: str) -> OrgRow | None:
        """The org, or None if it does not exist."""
        r = await self.pool.fetchrow(
            "SELECT id, plan, created_at FROM organizations WHERE id = $1", org
        )
        return None if r is None else _org_row(r)

    async def set_plan(self, org: str, plan: str) -> str | None:
        """Create the org with ``plan`` or change its plan; return the previous plan.

        None means the org was created: it had no row, or only the row the sync job
        inserts for an org it meets in events (``configured_at`` NULL, see
        migrations/0005_org_ids_and_creation.sql), which it may have written from this
        very call's plan_change event. Concurrent calls are serialised on the org's row,
        so each sees the plan the one before it set.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            while True:
                row = await conn.fetchrow(
                    "SELECT plan, configured_at FROM organizations WHERE id = $1 FOR UPDATE", org
                )
                if row is not None:
                    break
                created = await conn.fetchval(
                    "INSERT INTO organizations (id, plan, configured_at) VALUES ($1, $2, now())"
                    " ON CONFLICT (id) DO NOTHING RETURNING true",
                    org,
                    plan,
                )
                if created:
                    return None
                # Lost a race with another creator: lock its row and read its plan.
            await conn.execute(
                "UPDATE organizations SET plan = $2, updated_at = now(),"
                " configured_at = coalesce(configured_at, now()) WHERE id = $1",
                org,
                plan,
            )
            previous: str | None = row["plan"] if row["configured_at"] is not None else None
            return previous

    async def set_period_anchor(self, org: str, day: int, since: date, plan: str) -> None:
        """Record the org's period anchor (contract A12); creates the org on ``plan`` when
        it has no row yet."""
        await self.pool.execute(
            "INSERT INTO organizations (id, plan, configured_at, period_anchor_day,"
            " period_anchor_since) VALUES ($1, $2, now(), $3, $4)"
            " ON CONFLICT (id) DO UPDATE SET period_anchor_day = $3, period_anchor_since = $4,"
            " updated_at = now()",
            org,
            plan,
            day,
            since,
        )

    async def list_orgs(self) -> list[OrgRow]:
        """Every org, by id."""
        rows = await self.pool.fetch("SELECT id, plan, created_at FROM organizations ORDER BY id")
        return [_org_row(r) for r in rows]

    # --- API keys ------------------------------------------------------------------------

    async def create_api_key(
        self, org: str, user: str | None = None, name: str = ""
    ) -> tuple[ApiKeyRow, str]:
        """Create a key for ``org``; return its row and the plaintext key (shown once).

        Raises UnknownOrg if the org does not exist.
        """
        key = generate_api_key()
        try:
            r = await self.pool.fetchrow(
                "INSERT INTO api_keys (id, organization_id, user_id, name, key_hash, prefix)"
                " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
                new_key_id(),
                org,
                user,
                name,
                hash_api_key(key),
                display_prefix(key),
            )
        except asyncpg.ForeignKeyViolationError:
            raise UnknownOrg(
                f"organization {org!r} does not exist (create it with `creditgate orgs set-plan`)"
            ) from None
        assert r is not None  # INSERT ... RETURNING always returns the row
        return _key_row(r), key

    async def revoke_api_key(self, key_id: str) -> ApiKeyRow | None:
        """Revoke a key (idempotent: keeps the first revocation time); None if unknown."""
        r = await self.pool.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
            " WHERE id = $1 RETURNING *",
            key_id,
        )
        return None if r is None else _key_row(r)

    async def list_api_keys(self, org: str) -> list[ApiKeyRow]:
        """The org's keys, revoked ones included, oldest first."""
        rows = await self.pool.fetch(
            "SELECT * FROM api_keys WHERE organization_id = $1 ORDER BY created_at, id", org
        )
        return [_key_row(r) for r in rows]

    async def lookup_api_key(self, key_hash: bytes) -> ApiKeyRow | None:
        """The non-revoked key with this SHA-256 (see hash_api_key), or None."""
        r = await self.pool.fetchrow(
            "SELECT * FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
        )
        return None if r is None else _key_row(r)

    # --- grants --------------------------------------------------------------------------

    async def record_grant(
        self,
        org: str,
        bucket: str,
        amount: int,
        expires_at: datetime | None,
        reference: str,
    ) -> tuple[GrantRow, bool]:
        """Record a top-up once per (org, reference); return (row, newly created).

        A repeated call with the same reference returns the existing row and False (its
        ``expires_at`` is not compared: a retried webhook may compute a slightly different
        one). Raises GrantConflict if the reference was used for another bucket or amount,
        UnknownOrg if the org does not exist, ValueError on a non-positive amount, an empty
        bucket or reference, or a naive ``expires_at``.
        """
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise ValueError(f"grant amount must be a positive integer, got {amount!r}")
        if not bucket or not reference:
            raise ValueError("grant bucket and reference must not be empty")
        if expires_at is not None and expires_at.utcoffset() is None:
            raise ValueError("grant expires_at must be timezone-aware")
        try:
            r = await self.pool.fetchrow(
                "INSERT INTO token_grants (organization_id, token_type, amount, expires_at,"
                " reference) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (organization_id, reference) DO NOTHING RETURNING *",
                org,
                bucket,
                amount,
                expires_at,
                reference,
            )
        except asyncpg.ForeignKeyViolationError:
            raise UnknownOrg(f"organization {org!r} does not exist") from None
        if r is not None:
            return _grant_row(r), True
        # The conflicting row is committed (INSERT waited for it), so this sees it.
        r = await self.pool.fetchrow(
            "SELECT * FROM token_grants WHERE organization_id = $1 AND reference = $2",
            org,
            reference,
        )
        assert r is not None  # grants are never deleted
        existing = _grant_row(r)
        if existing.bucket != bucket or existing.amount != amount:
            raise GrantConflict(
                f"grant reference {reference!r} of org {org!r} was already used for"
                f" {existing.amount} tokens of {existing.bucket!r}, not {amount} of {bucket!r}"
            )
        return existing, False

    async def active_grants(self, org: str, now: datetime) -> list[GrantRow]:
        """The org's grants not expired at ``now``, oldest first."""
        rows = await self.pool.fetch(
            "SELECT * FROM token_grants WHERE organization_id = $1"
            " AND (expires_at IS NULL OR expires_at > $2) ORDER BY created_at, id",
            org,
            now,
        )
        return [_grant_row(r) for r in rows]

    # --- snapshots -----------------------------------------------------------------------

    async def org_snapshot(self, org: str, now: datetime | None = None) -> OrgSnapshot:
        """The org's plan, balances and purchased-token lots, read in one snapshot.

        Buckets come from ai_tokens (balance, extra, allocated, used, period; the org's
        ``seq`` is the highest over its rows). Each bucket's ``extra`` is split into lots
        by allocate_lots over the bucket's grants unexpired at ``now`` (default: the
        database's clock), so the lots always add up to ``extra``. Grants of buckets with
        no ai_tokens row are not included: until their event reaches Postgres the ledger
        does not know them.
        """
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            org_row = await conn.fetchrow(
                "SELECT plan, period_anchor_day, period_anchor_since FROM organizations"
                " WHERE id = $1",
                org,
            )
            plan: str | None = None if org_row is None else org_row["plan"]
            rows = await conn.fetch(
                "SELECT token_type, balance, extra, total_allocated, used, period, seq"
                " FROM ai_tokens WHERE organization_id = $1 ORDER BY token_type",
                org,
            )
            grant_rows = await conn.fetch(
                "SELECT * FROM token_grants WHERE organization_id = $1"
                " AND (expires_at IS NULL OR expires_at > coalesce($2, now()))",
                org,
                now,
            )
        grants: dict[str, list[GrantRow]] = {}
        for g in map(_grant_row, grant_rows):
            grants.setdefault(g.bucket, []).append(g)
        buckets = {
            r["token_type"]: BucketSnapshot(
                bucket=r["token_type"],
                balance=r["balance"],
                extra=r["extra"],
                allocated=r["total_allocated"],
                used=r["used"],
                period=r["period"],
                lots=allocate_lots(r["extra"], grants.get(r["token_type"], [])),
            )
            for r in rows
        }
        seq = max((r["seq"] for r in rows), default=0)
        anchor = ""
        if org_row is not None and org_row["period_anchor_day"] is not None:
            anchor = format_anchor(org_row["period_anchor_day"], org_row["period_anchor_since"])
        return OrgSnapshot(org=org, plan=plan, seq=seq, buckets=buckets, anchor=anchor)

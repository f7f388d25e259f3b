"""The design creditgate replaces: every metered request is one Postgres transaction.

Per request (a Starlette app on asyncpg, as the seed spec's deductTokens would be):
``SELECT balance ... FOR UPDATE`` on the org's row, ``UPDATE`` it, ``INSERT`` a usage-log
row, ``COMMIT``; then answer the same 100 bytes as bench/apps.py's bare app. All requests
of the benchmark hit ONE org, so they queue on that row's lock, which is what happens to
a busy tenant. Identity is the same API-key SHA-256 lookup the other peers do.

The tables (``peer_balances``, ``peer_usage_log``) are created by ``create_schema`` in the
throwaway bench database.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.apps import BODY, COST, FEATURE, PATH, Settings, bearer_identity

SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_balances (
    organization_id text NOT NULL,
    token_type text NOT NULL,
    balance bigint NOT NULL,
    PRIMARY KEY (organization_id, token_type)
);
CREATE TABLE IF NOT EXISTS peer_usage_log (
    id bigserial PRIMARY KEY,
    organization_id text NOT NULL,
    user_id text,
    feature_used text NOT NULL,
    token_type text NOT NULL,
    tokens_deducted integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS peer_usage_log_org ON peer_usage_log (organization_id, created_at);
"""

_LOCK = (
    "SELECT balance FROM peer_balances WHERE organization_id = $1 AND token_type = $2 FOR UPDATE"
)
_TAKE = (
    "UPDATE peer_balances SET balance = balance - $3 WHERE organization_id = $1 AND token_type = $2"
)
_LOG = (
    "INSERT INTO peer_usage_log (organization_id, user_id, feature_used, token_type, "
    "tokens_deducted) VALUES ($1, $2, $3, $4, $5)"
)


async def create_schema(dsn: str, orgs: list[str], balance: int) -> None:
    """Create the peer's tables and give every org ``balance`` tokens."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        await conn.executemany(
            "INSERT INTO peer_balances VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            [(org, FEATURE, balance) for org in orgs],
        )
    finally:
        await conn.close()


def pg_peer_app(
    settings: Settings, *, pool_size: int = 10, synchronous_commit: bool = True
) -> Starlette:
    """The peer app; ``synchronous_commit=False`` trades durability of the last commits for
    speed (the fairest setting for the peer: no fsync wait per request)."""
    digests = settings.key_digests()
    pool: Any = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal pool
        server_settings = {} if synchronous_commit else {"synchronous_commit": "off"}
        pool = await asyncpg.create_pool(
            settings.pg_dsn, min_size=pool_size, max_size=pool_size, server_settings=server_settings
        )
        try:
            yield
        finally:
            await pool.close()

    async def leads(request: Request) -> Response:
        ident = bearer_identity(request.headers.get("authorization"), digests)
        if ident is None:
            return JSONResponse({"code": "unauthenticated"}, status_code=401)
        org, user = ident
        async with pool.acquire() as conn, conn.transaction():
            balance = await conn.fetchval(_LOCK, org, FEATURE)
            if balance is None or balance < COST:
                return JSONResponse({"code": "insufficient_tokens"}, status_code=402)
            await conn.execute(_TAKE, org, FEATURE, COST)
            await conn.execute(_LOG, org, user, FEATURE, FEATURE, COST)
        return Response(BODY, media_type="application/json")

    return Starlette(routes=[Route(PATH, leads, methods=["POST"])], lifespan=lifespan)

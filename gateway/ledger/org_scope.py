"""The read-only transaction every read acting for one org runs in.

It sets ``creditgate.org_id`` (row-level security applies when the gateway connects as a
restricted role); every query run in it also filters by organization, so isolation never
depends on the role alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import asyncpg
from asyncpg.pool import PoolConnectionProxy

if TYPE_CHECKING:
    # A connection taken from the store's pool (generic only in the stubs).
    Conn = PoolConnectionProxy[asyncpg.Record]

__all__ = ["org_reader"]


@asynccontextmanager
async def org_reader(pool: asyncpg.Pool, org: str) -> AsyncIterator[Conn]:
    """A read-only transaction scoped to ``org`` (``SET LOCAL creditgate.org_id``)."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute("SELECT set_config('creditgate.org_id', $1, true)", org)
        yield conn

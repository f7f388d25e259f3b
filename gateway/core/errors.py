"""The exceptions that cross layers, in one place.

An outage of something creditgate depends on is one family, :class:`Unavailable`: every
entry point answers it the same way (503 with ``Retry-After``, fail closed, or let through
uncharged when ``fail_open`` is on) and never as "your key is wrong" or a 500. Errors that
never leave their own package (``BadPath`` in routing, ``JwtError`` in identity,
``StoreError`` in the ledger, ``ConfigError`` in config) stay next to the code that raises
them.
"""

from __future__ import annotations

import asyncpg

__all__ = [
    "UNAVAILABLE",
    "DatabaseMissing",
    "DatabaseUnavailable",
    "IdentityUnavailable",
    "JwksUnavailable",
    "LedgerUnavailable",
    "NoDatabase",
    "RedisUnavailable",
    "Unavailable",
]


class Unavailable(Exception):
    """A backing service (Redis, Postgres, a JWKS endpoint) cannot serve right now."""


class RedisUnavailable(Unavailable):
    """Redis could not be reached, did not answer in time, or cannot serve right now.

    After a timeout or a lost connection the command may or may not have run: it is never
    retried.
    """


class DatabaseUnavailable(Unavailable):
    """Postgres cannot be reached, refuses the connection, or the database is missing."""


class DatabaseMissing(DatabaseUnavailable):
    """The server is reachable but the DSN's database does not exist."""


class LedgerUnavailable(DatabaseUnavailable):
    """Postgres is needed for this call (e.g. to seed an org's state) and is unreachable."""


class IdentityUnavailable(Unavailable):
    """The key store (or JWKS endpoint) cannot be reached and nothing cached decides.

    The middleware answers 503: an outage must not look like "your key is wrong".
    """


class JwksUnavailable(IdentityUnavailable):
    """The JWKS endpoint could not be read and no keys are known: cannot decide."""


class NoDatabase(Exception):
    """The call needs Postgres but the config has no ``database_url`` (501, not 503)."""


#: What the HTTP APIs answer with 503: the family above, plus the raw connection errors
#: that asyncpg and the socket layer raise from a pool that lost its server mid-query.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    Unavailable,
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)

"""The result types of request identification (gateway.identity.identifier).

What an id may contain is one rule for every entry point: :mod:`gateway.core.ids`
(re-exported here for the identity modules that check ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.core.ids import MAX_ID_LENGTH, valid_id

__all__ = [
    "MAX_ID_LENGTH",
    "Identity",
    "IdentityFailure",
    "IdentityStats",
    "valid_id",
]


@dataclass(frozen=True, slots=True)
class Identity:
    """The org (and user) a request acts for, and how that was established.

    ``key_id``: the API key it came with; ``team``: the team a JWT claim or the middleware
    scope named (contract A10). An API key's own team is not here: charge.lua reads it
    from Redis, so moving a key to another team applies at once on every process.
    """

    org: str
    user: str | None
    via: str  # "api_key" | "jwt" | "header" | "scope"
    key_id: str | None = None
    team: str | None = None
    # Not part of its value: what the middleware adds to the app's request headers for
    # this identity, encoded by it the first time and kept here, as a cached identity
    # (an API key's, a JWT's) serves many requests (gateway/metering/middleware.py).
    inner_headers: tuple[tuple[bytes, bytes], ...] | None = field(
        default=None, compare=False, repr=False
    )


@dataclass(frozen=True, slots=True)
class IdentityFailure:
    """Why a request has no identity: 401, or 429 for an address sending bad credentials."""

    status: int
    detail: str
    retry_after: int | None = None


@dataclass(slots=True)
class IdentityStats:
    """Counters for metrics and tests."""

    key_cache_hits: int = 0
    redis_lookups: int = 0
    store_lookups: int = 0
    jwt_cache_hits: int = 0
    jwt_verifications: int = 0
    bad_credentials: int = 0
    throttled: int = 0

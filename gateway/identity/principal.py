"""The result types of request identification (gateway.identity.identifier) and what ids
may contain."""

from __future__ import annotations

from dataclasses import dataclass

MAX_ID_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Identity:
    """The org (and user) a request acts for, and how that was established."""

    org: str
    user: str | None
    via: str  # "api_key" | "jwt" | "header" | "scope"
    key_id: str | None = None


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


def valid_id(value: object) -> bool:
    """An org or user id: 1..200 printable ASCII characters, no whitespace.

    Ids end up in Redis keys and HTTP headers, so anything else is refused.
    """
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )

"""Who is calling: the organization (and user) a request acts for.

Sources, in order; the first one present decides, and a present but bad credential is a
401 (it never falls through to a weaker source):
1. ``scope["state"]["creditgate_org"]`` (and ``creditgate_user``, ``creditgate_team``),
   set by the app's own auth in middleware mode;
2. an API key, ``Authorization: Bearer cg_...`` or ``X-API-Key: cg_...``
   (gateway.identity.api_key_resolver: in-process cache, then Redis, then the store);
3. a JWT, ``Authorization: Bearer <jwt>`` (gateway.identity.jwt), verified tokens cached in
   process until ``exp`` but at most JWT_CACHE_SECONDS;
4. ``X-Org-Id`` / ``X-User-Id``, only when ``identity.trusted_headers`` is on.

An Authorization header we do not understand (another scheme, or a bearer token that is
neither an API key nor a JWT we accept) is left alone: it may be meant for the upstream.

Clients that keep presenting bad credentials are throttled per address
(gateway.identity.bad_credentials; behind ``identity.trusted_proxies`` the address their
forwarding header names, gateway.identity.client_address)
before anything is looked up or verified. A credential already known good in this process
is still accepted from a throttled address: that costs nothing and cannot help guessing
(only valid credentials are in those caches), while many honest users may share one
address behind a NAT with one broken client.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis, RedisCluster
from starlette.types import Scope

from gateway.config import IdentityConfig
from gateway.core.errors import IdentityUnavailable, JwksUnavailable
from gateway.core.ids import valid_id
from gateway.core.redis_keys import KeySpace
from gateway.core.ttlcache import TtlCache
from gateway.identity.api_key_resolver import ApiKeyResolver, KeyLookup, KeyRow
from gateway.identity.api_keys import hash_api_key, looks_like_api_key
from gateway.identity.bad_credentials import BadCredentialLimiter, client_address
from gateway.identity.client_address import TrustedProxies
from gateway.identity.jwt import JwtError, JwtVerifier, claim
from gateway.identity.principal import Identity, IdentityFailure, IdentityStats

__all__ = [
    "Identifier",
    "Identity",
    "IdentityFailure",
    "IdentityStats",
    "IdentityUnavailable",
    "KeyLookup",
    "KeyRow",
    "valid_id",
]

JWT_CACHE_SECONDS = 60.0
MAX_AUTHORIZATION_BYTES = 8192
# The request headers identity reads (ASGI header names are lower-case).
_IDENTITY_HEADERS = frozenset((b"authorization", b"x-api-key", b"x-org-id", b"x-user-id"))


def _header_id(raw: bytes) -> str | None:
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return value if valid_id(value) else None


def _claim_id(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and valid_id(value) else None


class Identifier:
    """Resolves a request's Identity (see the module docstring for the rules)."""

    def __init__(
        self,
        config: IdentityConfig,
        *,
        keyspace: KeySpace,
        redis: Redis | RedisCluster | None,
        store: KeyLookup | None,
        clock: Callable[[], float] = time.monotonic,
        max_cached_keys: int = 100_000,
        max_cached_tokens: int = 50_000,
    ) -> None:
        self.config = config
        self.stats = IdentityStats()
        self._clock = clock
        self.keys = ApiKeyResolver(
            keyspace=keyspace,
            redis=redis,
            store=store,
            key_cache_seconds=config.key_cache_seconds,
            clock=clock,
            stats=self.stats,
            max_cached_keys=max_cached_keys,
        )
        self._tokens: TtlCache[bytes, Identity] = TtlCache(max_cached_tokens)
        self._limiter = BadCredentialLimiter(config.bad_credentials_per_minute, clock=clock)
        self._proxies = TrustedProxies(config.trusted_proxies, config.forwarded_header)
        self._jwt = JwtVerifier(config.jwt, clock=clock) if config.jwt is not None else None

    async def identify(self, scope: Scope) -> Identity | IdentityFailure:
        """The request's Identity, or why it has none.

        Raises IdentityUnavailable when the answer depends on a store that is down.
        """
        decided = self.decide(scope)
        if not isinstance(decided, tuple):
            return decided
        api_key, raw = decided
        if api_key:
            return await self._by_api_key(raw, scope)
        return await self._by_jwt(raw, scope)

    def identify_nowait(self, scope: Scope) -> Identity | IdentityFailure | None:
        """``identify`` when it needs no I/O (a cached key or token, the scope, headers,
        or a refusal), else None: then await ``identify``. Saves the hot path a coroutine."""
        decided = self.decide(scope)
        return None if isinstance(decided, tuple) else decided

    def decide(self, scope: Scope) -> Identity | IdentityFailure | tuple[bool, bytes]:
        """:meth:`identify_nowait` without its wrapper: the answer when it needs no I/O,
        else a tuple (then await :meth:`identify`). The middleware's metered request calls
        this: one Python call fewer per request."""
        # Everything identify() can answer without I/O; else (is an API key, credential)
        # to look up. Nothing is recorded on that last path, so it may run twice.
        state = scope.get("state")
        if state and isinstance(state, dict):
            org = state.get("creditgate_org")
            if org is not None:
                return self._from_scope(
                    org, state.get("creditgate_user"), state.get("creditgate_team")
                )

        authorization = api_key = org_header = user_header = None
        for name, value in scope.get("headers") or ():
            if name not in _IDENTITY_HEADERS:
                continue  # most headers: one set probe instead of four comparisons
            if name == b"authorization":
                if authorization is not None:
                    return IdentityFailure(401, "more than one Authorization header")
                authorization = value
            elif name == b"x-api-key":
                if api_key is not None:
                    return IdentityFailure(401, "more than one X-API-Key header")
                api_key = value
            elif name == b"x-org-id":
                if org_header is not None:
                    return IdentityFailure(401, "more than one X-Org-Id header")
                org_header = value
            elif name == b"x-user-id":
                if user_header is not None:
                    return IdentityFailure(401, "more than one X-User-Id header")
                user_header = value

        bearer: bytes | None = None
        if authorization is not None:
            if len(authorization) > MAX_AUTHORIZATION_BYTES:
                return self._bad(scope, "Authorization header is too long")
            if authorization.startswith(b"Bearer "):
                bearer = authorization[7:].strip()  # the usual spelling, split cheaply
            else:
                parts = authorization.split(None, 1)
                if parts and parts[0].lower() == b"bearer":
                    bearer = parts[1].strip() if len(parts) == 2 else b""

        config = self.config
        if config.api_keys:
            raw = bearer if bearer is not None and bearer.startswith(b"cg_") else None
            if raw is None and api_key is not None:
                raw = api_key.strip()
            if raw is not None:
                # A key known good in this process, without another coroutine: the cache
                # holds digests of well-formed keys only, and an ASCII key's digest is that
                # of its bytes, so anything else misses and is checked in _by_api_key.
                hit = self.keys.cached(hashlib.sha256(raw).digest(), self._clock())
                if hit is not None:
                    self.stats.key_cache_hits += 1
                    return hit
                return (True, raw)
        if bearer is not None and self._jwt is not None:
            hit = self._tokens.get(hashlib.sha256(bearer).digest(), self._clock())
            if hit is not None:
                self.stats.jwt_cache_hits += 1
                return hit
            return (False, bearer)
        if config.trusted_headers and (org_header is not None or user_header is not None):
            return self._by_headers(org_header, user_header, scope)
        return IdentityFailure(401, self._missing_detail(authorization, bearer))

    async def revoke(self, key_id: str) -> bool:
        """Revoke an API key in the store and make every process refuse it.

        False when the store has no such key. Refused here at once, elsewhere within
        ``key_cache_seconds`` (see gateway.identity.api_key_resolver). Raises
        IdentityUnavailable when
        the store cannot be reached.
        """
        return await self.keys.revoke(key_id)

    def forget(self, key_hash: bytes) -> None:
        """Drop an API key (by SHA-256 digest) from this process's caches."""
        self.keys.forget(key_hash)

    # --- sources ---------------------------------------------------------------------

    def _from_scope(self, org: object, user: object, team: object) -> Identity | IdentityFailure:
        # The app's own auth said so: nothing to verify, and nothing to throttle.
        if not isinstance(org, str) or not valid_id(org):
            return IdentityFailure(401, "scope state creditgate_org is not a valid org id")
        if user is not None and (not isinstance(user, str) or not valid_id(user)):
            return IdentityFailure(401, "scope state creditgate_user is not a valid user id")
        if team is not None and (not isinstance(team, str) or not valid_id(team)):
            return IdentityFailure(401, "scope state creditgate_team is not a valid team id")
        return Identity(org, user, "scope", team=team)

    async def _by_api_key(self, raw: bytes, scope: Scope) -> Identity | IdentityFailure:
        try:
            key = raw.decode("ascii")
        except UnicodeDecodeError:
            key = ""
        if not looks_like_api_key(key):
            return self._bad(scope, "malformed API key")
        digest = hash_api_key(key)
        now = self._clock()
        keys = self.keys
        hit = keys.cached(digest, now)
        if hit is not None:
            self.stats.key_cache_hits += 1
            return hit
        address = client_address(scope, self._proxies)
        retry = self._limiter.retry_after(address)
        if retry is not None:
            return self._throttled(retry)
        if not keys.known_unknown(digest, now):
            identity = await keys.resolve(digest)
            if identity is not None:
                return identity
        return self._record_bad(address, "unknown or revoked API key")

    async def _by_jwt(self, token: bytes, scope: Scope) -> Identity | IdentityFailure:
        assert self._jwt is not None and self.config.jwt is not None
        digest = hashlib.sha256(token).digest()
        now = self._clock()
        hit = self._tokens.get(digest, now)
        if hit is not None:
            self.stats.jwt_cache_hits += 1
            return hit
        address = client_address(scope, self._proxies)
        retry = self._limiter.retry_after(address)
        if retry is not None:
            return self._throttled(retry)
        self.stats.jwt_verifications += 1
        try:
            payload = await self._jwt.verify(token)
        except JwtError as exc:
            return self._record_bad(address, exc.detail)
        except JwksUnavailable as exc:
            raise IdentityUnavailable(str(exc)) from exc
        org_claim, user_claim = self.config.jwt.org_claim, self.config.jwt.user_claim
        # A validly signed token without a usable org is no guessing attempt: not counted.
        org = _claim_id(claim(payload, org_claim))
        if org is None:
            return IdentityFailure(401, f"JWT lacks a valid {org_claim!r} claim")
        raw_user = claim(payload, user_claim)
        user = None if raw_user is None else _claim_id(raw_user)
        if raw_user is not None and user is None:
            return IdentityFailure(401, f"JWT claim {user_claim!r} is not a valid id")
        team = None
        team_claim = self.config.jwt.team_claim
        if team_claim is not None:
            raw_team = claim(payload, team_claim)
            team = None if raw_team is None else _claim_id(raw_team)
            if raw_team is not None and team is None:
                return IdentityFailure(401, f"JWT claim {team_claim!r} is not a valid id")
        identity = Identity(org, user, "jwt", team=team)
        # Until exp, but never long: a key rotated out upstream must stop working.
        ttl = min(float(payload["exp"]) - time.time(), JWT_CACHE_SECONDS)
        if ttl > 0:
            self._tokens.put(digest, identity, self._clock() + ttl)
        return identity

    def _by_headers(
        self, org_raw: bytes | None, user_raw: bytes | None, scope: Scope
    ) -> Identity | IdentityFailure:
        if org_raw is None:
            return self._bad(scope, "X-User-Id without X-Org-Id")
        org = _header_id(org_raw)
        user = None if user_raw is None else _header_id(user_raw)
        if org is None or (user_raw is not None and user is None):
            return self._bad(scope, "X-Org-Id / X-User-Id must be 1-200 printable ASCII chars")
        return Identity(org, user, "header")

    def _missing_detail(self, authorization: bytes | None, bearer: bytes | None) -> str:
        if bearer is not None:
            if self.config.api_keys:
                return "bearer token is not an API key, and JWTs are not accepted"
            return "bearer token not accepted: API keys and JWTs are both disabled"
        if authorization is not None:
            return "unsupported Authorization scheme (use Bearer)"
        accepted = []
        if self.config.api_keys:
            accepted.append("Authorization: Bearer <API key> or X-API-Key")
        if self._jwt is not None:
            accepted.append("Authorization: Bearer <JWT>")
        if self.config.trusted_headers:
            accepted.append("X-Org-Id")
        return "no credentials: send " + (" or ".join(accepted) or "nothing is accepted")

    # --- bad credentials ---------------------------------------------------------------

    def _bad(self, scope: Scope, detail: str) -> IdentityFailure:
        address = client_address(scope, self._proxies)
        retry = self._limiter.retry_after(address)
        if retry is not None:
            return self._throttled(retry)
        return self._record_bad(address, detail)

    def _record_bad(self, address: str, detail: str) -> IdentityFailure:
        self.stats.bad_credentials += 1
        self._limiter.record(address)
        return IdentityFailure(401, detail)

    def _throttled(self, retry_after: int) -> IdentityFailure:
        self.stats.throttled += 1
        return IdentityFailure(429, "too many bad credentials from this address", retry_after)

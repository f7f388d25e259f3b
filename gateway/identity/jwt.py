"""Local verification of bearer JWTs (e.g. Supabase access tokens).

HS* tokens are checked against ``jwt.secret``; RS*/ES*/PS*/EdDSA tokens against the keys
published at ``jwt.jwks_url``. ``none`` is never accepted, whatever the config says, and an
algorithm family is only accepted when its key source is configured, so a token cannot
pick the verification method (the classic "HS256 signed with the public key" confusion).

JWKS keys are fetched with PyJWT's PyJWKClient, whose I/O is blocking, so every fetch runs
in a worker thread and the keys are kept here by ``kid``: a request whose key is known does
no I/O. The set is refetched when older than JWKS_MAX_AGE (keys removed upstream stop
working), and on a token with an unknown ``kid`` (key rotation) at most once per
JWKS_REFRESH_COOLDOWN, so tokens with made-up kids cannot make us hammer the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient
from jwt.types import Options

from gateway.config import JwtConfig
from gateway.core.errors import JwksUnavailable

log = logging.getLogger(__name__)

# Seconds between refreshes forced by an unknown kid (and between retries after a failure).
JWKS_REFRESH_COOLDOWN = 60.0
# Seconds after which the key set is refetched even when every kid is known.
JWKS_MAX_AGE = 300.0
# Seconds to wait before retrying the first fetch after it failed.
JWKS_FIRST_RETRY = 5.0
JWKS_FETCH_TIMEOUT = 10.0

_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})


class JwtError(Exception):
    """The token is not acceptable; ``detail`` says why (safe to show the client)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def claim(payload: dict[str, Any], path: str) -> Any:
    """The claim at ``path``: a top-level name, else a dotted path ("app_metadata.org_id")."""
    if path in payload:
        return payload[path]
    node: Any = payload
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class JwtVerifier:
    """Verifies signature, ``exp`` (required), ``nbf``, and ``aud``/``iss`` when configured."""

    def __init__(self, config: JwtConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        algorithms = {a for a in config.algorithms if a.lower() != "none"}
        self._hmac_algs = algorithms & _HMAC_ALGORITHMS if config.secret else frozenset()
        self._jwks_algs = algorithms - _HMAC_ALGORITHMS if config.jwks_url else frozenset()
        if not self._hmac_algs and not self._jwks_algs:
            raise ValueError(
                "identity.jwt accepts no algorithm: HS* needs jwt.secret, "
                "RS*/ES*/PS*/EdDSA need jwt.jwks_url"
            )
        self._secret = (config.secret or "").encode("utf-8")
        self._audience = config.audience
        self._issuer = config.issuer
        self._leeway = config.leeway_seconds
        self._options: Options = {
            "require": ["exp"],
            # Without a configured audience, ignore "aud" (Supabase always sets it);
            # PyJWT would otherwise reject every token that has one.
            "verify_aud": config.audience is not None,
        }
        self._clock = clock
        self._client: PyJWKClient | None = None
        if config.jwks_url and self._jwks_algs:
            # Our own cache below replaces PyJWKClient's, so every call really fetches.
            self._client = PyJWKClient(
                config.jwks_url, cache_jwk_set=False, timeout=JWKS_FETCH_TIMEOUT
            )
        self._keys: dict[str, PyJWK] | None = None
        self._fetched_at = 0.0
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()
        self.jwks_fetches = 0  # for tests and metrics

    async def verify(self, token: bytes) -> dict[str, Any]:
        """The verified claims of ``token``.

        Raises JwtError when it is not acceptable, JwksUnavailable when its key cannot be
        known because the JWKS endpoint is down and was never read.
        """
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise JwtError("malformed JWT") from None
        alg = header.get("alg")
        key: PyJWK | bytes
        if not isinstance(alg, str):
            raise JwtError("JWT header has no algorithm")
        if alg in self._hmac_algs:
            key = self._secret
        elif alg in self._jwks_algs:
            kid = header.get("kid")
            if not isinstance(kid, str):
                raise JwtError("JWT has no kid header")
            found = await self._signing_key(kid)
            if found is None:
                raise JwtError("JWT signed with an unknown key")
            key = found
        else:
            raise JwtError(f"JWT algorithm {str(alg)[:20]!r} is not accepted")
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise JwtError("JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise JwtError("JWT is not valid yet") from None
        except jwt.InvalidSignatureError:
            raise JwtError("JWT signature is invalid") from None
        except jwt.InvalidAudienceError:
            raise JwtError("JWT audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise JwtError("JWT issuer is not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise JwtError(f"JWT lacks the {exc.claim!r} claim") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise JwtError("invalid JWT") from None
        return payload

    async def _signing_key(self, kid: str) -> PyJWK | None:
        now = self._clock()
        if self._keys is None:
            if self._last_attempt is not None and now - self._last_attempt < JWKS_FIRST_RETRY:
                raise JwksUnavailable("JWKS endpoint unreachable (retrying shortly)")
            await self._refresh(now)
            if self._keys is None:
                raise JwksUnavailable("JWKS endpoint unreachable")
        elif now - self._fetched_at > JWKS_MAX_AGE and self._may_retry(now):
            await self._refresh(now)
        keys = self._keys or {}
        key = keys.get(kid)
        if key is None and self._may_retry(now):
            await self._refresh(now)
            key = (self._keys or {}).get(kid)
        return key

    def _may_retry(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= JWKS_REFRESH_COOLDOWN

    async def _refresh(self, requested_at: float) -> None:
        """Refetch the key set, unless another request did so while we waited."""
        assert self._client is not None  # only JWKS algorithms get here
        async with self._lock:
            if self._last_attempt is not None and self._last_attempt >= requested_at:
                return
            self._last_attempt = self._clock()
            self.jwks_fetches += 1
            try:
                found = await asyncio.to_thread(self._client.get_signing_keys)
            except (jwt.PyJWTError, OSError, ValueError) as exc:
                if self._keys is None:
                    raise JwksUnavailable(f"cannot read the JWKS: {exc}") from exc
                log.warning("JWKS refresh failed, keeping the keys known so far: %s", exc)
                return
            self._keys = {k.key_id: k for k in found if k.key_id}
            self._fetched_at = self._clock()

"""The admin token: who may use ``/admin`` and see ``/readyz``'s error details.

``Authorization: Bearer <admin_token>``, compared in constant time
(``hmac.compare_digest``). An address that keeps sending wrong tokens is throttled like
bad API keys (gateway.identity.bad_credentials), and like them behind
``identity.trusted_proxies`` per client address, not per load balancer; one limiter per
deployment, shared by every endpoint that accepts the token, so ``/readyz`` is no side
door for guessing it.
With no ``admin_token`` configured no request is the admin.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from gateway.config import Config
from gateway.http.errors import ApiError
from gateway.identity.bad_credentials import BadCredentialLimiter, client_address
from gateway.identity.client_address import TrustedProxies

__all__ = ["AdminAuth"]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="creditgate-admin"'}


class AdminAuth:
    """Checks requests for the admin token (see the module docstring)."""

    def __init__(
        self,
        token: str | None,
        *,
        bad_credentials_per_minute: int,
        proxies: TrustedProxies | None = None,
    ) -> None:
        self._expected = token.encode() if token else None
        self._limiter = BadCredentialLimiter(bad_credentials_per_minute)
        self._proxies = proxies

    @classmethod
    def of(cls, config: Config) -> AdminAuth:
        """The admin check of a deployment's config."""
        identity = config.identity
        return cls(
            config.admin_token,
            bad_credentials_per_minute=identity.bad_credentials_per_minute,
            proxies=TrustedProxies(identity.trusted_proxies, identity.forwarded_header),
        )

    @property
    def configured(self) -> bool:
        """Whether an admin token exists at all (without one, /admin does not exist)."""
        return self._expected is not None

    def _matches(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return (
            self._expected is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), self._expected
            )
        )

    def authorize(self, request: Request) -> None:
        """Return if ``request`` carries the admin token; else raise 429 or 401."""
        address = client_address(request.scope, self._proxies)
        retry = self._limiter.retry_after(address)
        if retry is not None:
            raise ApiError(
                429, "rate_limited", "Too many bad credentials",
                "too many bad admin tokens from this address", retry_after=retry,
            )  # fmt: skip
        if not self._matches(request):
            self._limiter.record(address)
            raise ApiError(
                401, "unauthenticated", "Unauthenticated",
                "send Authorization: Bearer <admin_token>", headers=_CHALLENGE,
            )  # fmt: skip

    def allows(self, request: Request) -> bool:
        """Whether ``request`` carries the admin token; never raises.

        For endpoints that answer everyone and tell the admin more. A wrong token counts
        against the address like on ``/admin``; a throttled address is never the admin.
        """
        if self._expected is None or "authorization" not in request.headers:
            return False
        address = client_address(request.scope, self._proxies)
        if self._limiter.retry_after(address) is not None:
            return False
        if self._matches(request):
            return True
        self._limiter.record(address)
        return False

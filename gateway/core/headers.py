"""The one header policy: what a client may send that must never reach the app.

Both modes apply it, to every request, metered or not: the middleware
(gateway.metering.middleware) cleans the request headers before the app (or, in proxy
mode, ``UpstreamProxy``) sees them, and the proxy drops :data:`OVERRIDE_HEADERS` again with
its hop-by-hop handling. Removed:

- ``X-Creditgate-*``: the middleware's own identity headers, which the app trusts;
- :data:`OVERRIDE_HEADERS`: headers some frameworks honour to change the method or path,
  which would let an unmetered spelling of a request run a metered handler;
- ``X-Org-Id`` / ``X-User-Id`` unless ``identity.trusted_headers`` is on (the app must not
  take the client's claim for an identity creditgate refused to honour);
- the caller's creditgate credential (``Authorization: Bearer cg_...``, ``X-API-Key:
  cg_...``) unless ``forward_credentials`` is on. Any other credential (a JWT, the app's own
  API key) is the app's and passes untouched;
- the underscore spelling of every name above (``X_Creditgate_Org``): servers in the CGI
  tradition (``HTTP_X_CREDITGATE_ORG``) merge it with the dash spelling.

Header names are compared ignoring case and ``_``/``-``. A client that sends two
``Idempotency-Key`` headers is reported (the gateway and the app could each pick another
one); the underscore spelling of that header, which the gateway does not read, is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "IDEMPOTENCY_KEY",
    "IDENTITY_HEADERS",
    "OURS_PREFIX",
    "OVERRIDE_HEADERS",
    "Cleaned",
    "HeaderPolicy",
    "canonical",
    "is_creditgate_credential",
]

Header = tuple[bytes, bytes]

OURS_PREFIX = b"x-creditgate-"
"""The middleware's headers (X-Creditgate-Org, -User, -Feature, -Request-Id...)."""

OVERRIDE_HEADERS = frozenset(
    {
        b"x-http-method-override",  # Rack, Express method-override, ASP.NET, Symfony
        b"x-http-method",  # OData, Google APIs
        b"x-method-override",
        b"x-original-url",  # IIS URL Rewrite, Symfony (trusted proxies)
        b"x-rewrite-url",  # IIS, older Zend/Symfony
    }
)
"""Headers some frameworks honour to change the method or path of a request."""

IDENTITY_HEADERS = frozenset({b"x-org-id", b"x-user-id"})
"""The trusted-header identity (honoured only with ``identity.trusted_headers``)."""

IDEMPOTENCY_KEY = b"idempotency-key"
_AUTHORIZATION = b"authorization"
_API_KEY = b"x-api-key"
_KEY_PREFIX = b"cg_"  # gateway.identity.api_keys.KEY_PREFIX (core may not import identity)

Cleaned = tuple[list[Header] | None, str | None, bool]
"""``(headers, idempotency key, duplicate idempotency key)``; ``headers`` is None when the
request has nothing to remove, so the caller can use its own list as it is."""


def canonical(name: bytes) -> bytes:
    """A header name lower-cased, with underscores read as dashes."""
    return name.lower().replace(b"_", b"-")


def is_creditgate_credential(name: bytes, value: bytes) -> bool:
    """Does header ``name`` (canonical) carry a creditgate API key? Parsed as the
    identifier parses it (gateway.identity.identifier): any case of ``Bearer``, spaces
    around the token."""
    if name == _AUTHORIZATION:
        parts = value.split(None, 1)
        return (
            len(parts) == 2 and parts[0].lower() == b"bearer" and parts[1].startswith(_KEY_PREFIX)
        )
    return name == _API_KEY and value.strip().startswith(_KEY_PREFIX)


class HeaderPolicy:
    """The policy for one config; :meth:`clean` applies it to a request's headers."""

    __slots__ = ("_drop", "_drop_credentials", "_suspect")

    def __init__(self, *, trusted_headers: bool = False, forward_credentials: bool = False) -> None:
        drop = set(OVERRIDE_HEADERS)
        if not trusted_headers:
            drop |= IDENTITY_HEADERS
        self._drop = frozenset(drop)
        self._drop_credentials = not forward_credentials
        # First bytes of every name the policy may act on, in either case: a request whose
        # header names all start elsewhere has nothing to clean (the common case, decided
        # by one cheap pass). x: X-Creditgate-*, the overrides, X-Org-Id, X-API-Key;
        # i: Idempotency-Key; a: Authorization.
        first = b"xXiI" + (b"aA" if self._drop_credentials else b"")
        self._suspect = frozenset(first)

    def clean(self, headers: Sequence[Header]) -> Cleaned:
        """Apply the policy to ``headers`` (an ASGI scope's list, never modified)."""
        suspect = self._suspect
        try:
            for name, _ in headers:
                if name[0] in suspect:
                    break
            else:
                return None, None, False
        except IndexError:  # an empty name: the full pass below keeps it
            pass
        return self._filter(headers)

    def _filter(self, headers: Sequence[Header]) -> Cleaned:
        suspect, drop = self._suspect, self._drop
        out: list[Header] = []
        idempotency_key: str | None = None
        seen_key = duplicate = False
        for header in headers:
            name = header[0]
            if not name or name[0] not in suspect:
                out.append(header)
                continue
            lname = canonical(name)
            if lname.startswith(OURS_PREFIX) or lname in drop:
                continue
            if lname == IDEMPOTENCY_KEY:
                if b"_" in name:
                    continue  # not read by the gateway: the app must not read it either
                duplicate = duplicate or seen_key
                seen_key = True
                idempotency_key = header[1].decode("latin-1") or None
            elif self._drop_credentials and is_creditgate_credential(lname, header[1]):
                continue
            out.append(header)
        return out, idempotency_key, duplicate

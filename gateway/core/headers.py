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
        if value.startswith(b"Bearer cg_"):  # the usual spellings, decided cheaply
            return True
        if _KEY_PREFIX not in value:
            return False
        parts = value.split(None, 1)
        return (
            len(parts) == 2 and parts[0].lower() == b"bearer" and parts[1].startswith(_KEY_PREFIX)
        )
    return name == _API_KEY and value.strip().startswith(_KEY_PREFIX)


# What the first byte of a header name says: nothing to look at (most names); the full
# pass (an upper-case X, I or A: ASGI names are lower case, so in practice never); or a
# lower-case a, x or i, which the first pass looks at more closely.
_PASS, _FULL, _LOWER_A, _LOWER_X, _LOWER_I = 0, 1, 2, 3, 4
_AUTHORIZATION_LENGTH = len(_AUTHORIZATION)


class HeaderPolicy:
    """The policy for one config; :meth:`clean` applies it to a request's headers.

    A first pass decides the usual requests without building anything: nothing to remove
    (most names start with another letter; Accept-*, X-Forwarded-*, X-Request-Id,
    If-None-Match... are recognised as harmless), or nothing but one Authorization header
    that carries a creditgate key. Anything else takes the full pass, which reads every
    name ignoring case and ``_``/``-``; both passes give the same answer.
    """

    __slots__ = ("_drop", "_drop_credentials", "_first", "_x_stop")

    def __init__(self, *, trusted_headers: bool = False, forward_credentials: bool = False) -> None:
        drop = set(OVERRIDE_HEADERS)
        if not trusted_headers:
            drop |= IDENTITY_HEADERS
        self._drop = frozenset(drop)
        self._drop_credentials = not forward_credentials
        # Lower-case x- names the first pass may not wave through (X-Creditgate-* aside).
        self._x_stop = self._drop | ({_API_KEY} if self._drop_credentials else set())
        first = [_PASS] * 256
        first[ord("x")], first[ord("i")] = _LOWER_X, _LOWER_I
        first[ord("X")] = first[ord("I")] = _FULL
        if self._drop_credentials:
            first[ord("a")], first[ord("A")] = _LOWER_A, _FULL
        self._first = tuple(first)

    def clean(self, headers: Sequence[Header]) -> Cleaned:
        """Apply the policy to ``headers`` (an ASGI scope's list, never modified)."""
        first, x_stop = self._first, self._x_stop
        credential: Header | None = None
        idempotency_key: str | None = None
        seen_key = False
        try:
            for header in headers:
                name = header[0]
                kind = first[name[0]]
                if not kind:
                    continue
                if kind == _LOWER_X:  # X-Forwarded-For, X-Request-Id...: kept
                    if (
                        name in x_stop
                        or name.startswith(OURS_PREFIX)
                        or b"_" in name
                        or not name.islower()
                    ):
                        break
                elif kind == _LOWER_A:  # Authorization, or Accept-*
                    if len(name) != _AUTHORIZATION_LENGTH or (
                        name != _AUTHORIZATION and name.lower() != _AUTHORIZATION
                    ):
                        continue
                    if name != _AUTHORIZATION or credential is not None:
                        break  # another spelling, or a second one
                    value = header[1]
                    # The usual spelling decided here; is_creditgate_credential the rest.
                    if value.startswith(b"Bearer cg_") or is_creditgate_credential(name, value):
                        credential = header
                elif kind == _LOWER_I:  # Idempotency-Key, If-None-Match...
                    if name == IDEMPOTENCY_KEY and not seen_key:
                        seen_key = True
                        idempotency_key = header[1].decode("latin-1") or None
                    elif name == IDEMPOTENCY_KEY or b"_" in name or not name.islower():
                        break  # a second key (reported by the full pass), another spelling
                else:
                    break
            else:
                if credential is None:
                    return None, idempotency_key, False
                # A copy without it, built in C (a comprehension is one more Python frame).
                # The first equal header is this one: a second Authorization breaks above.
                kept = list(headers)
                kept.remove(credential)
                return kept, idempotency_key, False
        except IndexError:  # an empty name: the full pass keeps it
            pass
        return self._filter(headers)

    def _filter(self, headers: Sequence[Header]) -> Cleaned:
        first, drop = self._first, self._drop
        out: list[Header] = []
        keep = out.append
        idempotency_key: str | None = None
        seen_key = duplicate = False
        for header in headers:
            name = header[0]
            if not name or not first[name[0]]:
                keep(header)
                continue
            lname = name.lower()
            if b"_" in lname:
                lname = lname.replace(b"_", b"-")
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
            keep(header)
        return out, idempotency_key, duplicate

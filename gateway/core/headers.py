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
from operator import itemgetter

__all__ = [
    "IDEMPOTENCY_KEY",
    "IDENTITY_HEADERS",
    "OURS_PREFIX",
    "OVERRIDE_HEADERS",
    "Cleaned",
    "HeaderPolicy",
    "Inspected",
    "applied",
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

_Plan = tuple[int, int]
_FULL_PASS = -2
_FULL_PLAN: _Plan = (_FULL_PASS, _FULL_PASS)
Inspected = tuple[int | list[Header], str | None, bool]
"""``(removal, idempotency key, duplicate idempotency key)``: :meth:`HeaderPolicy.inspect`'s
verdict before any list is built. ``removal`` is -1 (nothing to remove), the index of the
one header to drop (a creditgate credential), or the full pass's cleaned list; :func:`applied`
turns it into :data:`Cleaned`'s ``headers``."""

_NOTHING: Cleaned = (None, None, False)
_KEEP_ALL: Inspected = (-1, None, False)
_PLANS = 256  # sequences of header names remembered per policy
_PLAN_MAX_NAMES = 64  # longer sequences are planned on every request, never kept
_PLAN_MAX_BYTES = 4096  # nor sequences of longer names: the plans hold at most ~1 MiB
_name_of = itemgetter(0)


class HeaderPolicy:
    """The policy for one config; :meth:`clean` applies it to a request's headers.

    What the policy does to a request depends on its header *names* but for two values:
    whether an ``Authorization`` header carries a creditgate key, and the
    ``Idempotency-Key``. So the decision is made once per sequence of names (a client
    library sends the same names in the same order on every request) and kept: a *plan*,
    either "nothing to remove but maybe the one lower-case ``authorization`` header at
    index i; the one ``idempotency-key`` at index j", or "take the full pass". A request
    whose names were seen before costs a tuple of its names and one dict lookup instead of
    a Python loop over its headers (bench/hotpath_parts.py: ~7.4 k -> ~2 k instructions
    for a 5-header request). The plan is what the first pass of the names alone decides:
    most names start with another letter; Accept-*, X-Forwarded-*, X-Request-Id,
    If-None-Match... are recognised as harmless. Anything else takes the full pass, which
    reads every name ignoring case and ``_``/``-``; both passes give the same answer.
    """

    __slots__ = ("_drop", "_drop_credentials", "_first", "_plans", "_x_stop")

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
        # names -> plan (_plan); bounded: emptied when full, so a client sending ever new
        # names costs memory no more than _PLANS entries.
        self._plans: dict[tuple[bytes, ...], _Plan] = {}

    def clean(self, headers: Sequence[Header]) -> Cleaned:
        """Apply the policy to ``headers`` (an ASGI scope's list, never modified)."""
        removal, idempotency_key, duplicate = self.inspect(headers)
        return applied(headers, removal), idempotency_key, duplicate

    def inspect(self, headers: Sequence[Header]) -> Inspected:
        """:meth:`clean`'s verdict on ``headers`` without the cleaned copy: the caller
        builds it with :func:`applied` when it needs it (the middleware's fixed-cost
        request, once admitted: a list alive across the charge's wait is one more object
        for the cycle collector's young passes to count, BENCHMARKS.md section 1, round
        10). The full pass's list is built as it reads."""
        try:
            names = tuple(map(_name_of, headers))
            plan = self._plans.get(names)
        except TypeError:  # a name that is not bytes (unhashable): the full pass reads it
            return self._filter(headers)
        if plan is None:
            plan = self._learn(names)
        auth, idem = plan
        if auth < 0:
            if auth == _FULL_PASS:
                return self._filter(headers)
            if idem < 0:
                return _KEEP_ALL
            return -1, headers[idem][1].decode("latin-1") or None, False
        idempotency_key = None if idem < 0 else headers[idem][1].decode("latin-1") or None
        value = headers[auth][1]
        # The usual spelling decided here; is_creditgate_credential the rest.
        if value.startswith(b"Bearer cg_") or is_creditgate_credential(_AUTHORIZATION, value):
            return auth, idempotency_key, False
        return -1, idempotency_key, False

    def _learn(self, names: tuple[bytes, ...]) -> _Plan:
        plan = self._plan(names)
        plans = self._plans
        if len(plans) >= _PLANS:
            plans.clear()
        # (Only on a miss: the sum is not on the usual path.)
        if len(names) <= _PLAN_MAX_NAMES and sum(map(len, names)) <= _PLAN_MAX_BYTES:
            plans[names] = plan
        return plan

    def _plan(self, names: tuple[bytes, ...]) -> _Plan:
        """What the names alone decide: ``(index of the one lower-case authorization
        header or -1, index of the one idempotency-key header or -1)``, or
        :data:`_FULL_PLAN` when the full pass must read the request."""
        first, x_stop = self._first, self._x_stop
        auth = idem = -1
        for index, name in enumerate(names):
            if not name:
                return _FULL_PLAN  # an empty name: the full pass keeps it
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
                    return _FULL_PLAN
            elif kind == _LOWER_A:  # Authorization, or Accept-*
                if len(name) != _AUTHORIZATION_LENGTH or name.lower() != _AUTHORIZATION:
                    continue
                if name != _AUTHORIZATION or auth >= 0:
                    return _FULL_PLAN  # another spelling, or a second one
                auth = index
            elif kind == _LOWER_I:  # Idempotency-Key, If-None-Match...
                if name == IDEMPOTENCY_KEY and idem < 0:
                    idem = index
                elif name == IDEMPOTENCY_KEY or b"_" in name or not name.islower():
                    return _FULL_PLAN  # a second key (reported by the full pass), another spelling
            else:
                return _FULL_PLAN
        return auth, idem

    def _filter(self, headers: Sequence[Header]) -> tuple[list[Header], str | None, bool]:
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


def applied(headers: Sequence[Header], removal: int | list[Header]) -> list[Header] | None:
    """``headers`` as :meth:`HeaderPolicy.inspect`'s ``removal`` leaves them: a new list,
    or None when nothing is removed (the caller's list can be used as it is)."""
    if isinstance(removal, list):
        return removal  # the full pass's
    if removal < 0:
        return None
    # A copy without it, built in C (a comprehension is one more Python frame).
    kept = list(headers)
    del kept[removal]
    return kept

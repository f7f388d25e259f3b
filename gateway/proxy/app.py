"""Reverse proxy core: a pure ASGI app that forwards each request to the upstream.

Bodies stream both ways. A request body goes to the HTTP client as an async generator over
the ASGI ``http.request`` messages, so the upstream starts receiving before the client has
finished sending; a small response (Content-Length <= ``max_buffered_body``) is read whole
and sent as one message (or, with the usage tap of a usage-cost route in front, handed to it
with its start in one call: ``USAGE_TAP``), anything else is relayed chunk by chunk as it
arrives.

Errors before the upstream's response headers become problem+json 502 (``bad_gateway``) or
504 (``upstream_timeout``), which the metering middleware treats as a refund. A request that
finds every upstream connection busy (``max_connections`` per process and event loop) waits
at most ``pool_wait`` seconds for one, then gets 503 (``unavailable``) with ``Retry-After``
and nothing is sent upstream: a refund too (lean and httpx clients; aiohttp counts that
wait as connecting, bounded by ``ClientTimeout.connect``, the larger of the read and
connect timeouts, so 504). A failure after
the response has started cannot change the status: it is recorded in
``scope["state"][UPSTREAM_ERROR]`` and the body is ended. The upstream's status and time to
headers go to ``UPSTREAM_STATUS`` / ``UPSTREAM_LATENCY_MS`` (gateway/core/scope_keys.py).

A client that leaves mid-response ends the relay at once (``CLIENT_DISCONNECTED``), unless
the metering middleware asked for draining (``USAGE_DRAIN_SECONDS``: the charge is read
from the usage at the stream's end): then the relay goes on for at most that many seconds
after the client left, still handing every chunk to ``send`` (the middleware's tap reads
it and, the client being gone, forwards nothing), so the usage arrives and is charged.

Streams on the lean client take a fast path when the server offers the response splice
(gateway/core/splice.py: ``creditgate serve`` does) and nothing between here and the
server needs the body pieces through ``send`` (unmetered requests, fixed-cost routes, and
usage-cost event streams, whose tap observes each piece as the splice writes it; not an
``Idempotency-Key``'s, whose response is kept, nor a usage-cost JSON answer, held for its
usage): the start and the end still go through ``send``, but each upstream body piece is
written to the client from inside the upstream connection's ``data_received``, with
reading from the upstream paused while the client's buffer is full. Disconnects (with the
drain of a usage-cost stream), upstream errors and timeouts are handled as on the ASGI
path, with the same outcomes.

Request headers: hop-by-hop ones are dropped here, and so are the method/path override
headers of the one header policy (gateway/core/headers.py), which the middleware in front
applies in full; every name is compared ignoring case and ``_``/``-``. With the lean client
the usual request (lowercase names, no underscore) takes a cheaper road to the same bytes:
the head is built here in bytes with set, dict and join operations (``_lean_lines``,
``lean_client.frame``), and the response's names, lowercased by the connection in one go,
are paired with their values in C when no hop-by-hop header came (tests/proxy/
test_lean_fast_path.py compares both roads).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import quote, urlsplit

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from gateway.core.headers import OURS_PREFIX, OVERRIDE_HEADERS
from gateway.core.loops import running_loop
from gateway.core.problem import send_problem
from gateway.core.scope_keys import (
    CLIENT_DISCONNECTED,
    UPSTREAM_ERROR,
    UPSTREAM_LATENCY_MS,
    UPSTREAM_STATUS,
    USAGE_DRAIN_SECONDS,
    USAGE_TAP,
)
from gateway.core.splice import ResponseSplice, splice_for
from gateway.proxy.lean_client import LeanBackend, LeanResponse, Origin, frame, origin_of

if TYPE_CHECKING:
    import httpx

Body = bytes | AsyncIterator[bytes] | None
Headers = list[tuple[str, str]]
RawHeaders = list[tuple[bytes, bytes]]
Errors = tuple[type[BaseException], ...]

# RFC 9110 7.6.1, plus the non-standard Proxy-Connection some clients still send.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
# Host becomes the upstream's; our server already answered Expect; the X-Forwarded-* trio
# is rebuilt from the connection instead of trusted from the client.
_REQUEST_DROP = (
    HOP_BY_HOP
    | OVERRIDE_HEADERS  # would let a client reach a metered route under another spelling
    | {
        b"host",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)
# What the lean client's fast path leaves out of the forwarded lines: the same, and
# Content-Length, which the client writes itself from the body it sends.
_LEAN_DROP = _REQUEST_DROP | {b"content-length"}
_USUAL_DROP = frozenset({b"host", b"content-length"})
_PROTO_LINES = {s: b"x-forwarded-proto: %b\r\n" % s.encode() for s in ("http", "https")}
# Below the keep-alive of common upstream servers (uvicorn: 5 s), so the pool does not reuse
# a connection the upstream is closing (a spurious 502 on a POST otherwise).
_KEEPALIVE_S = 4.0
_CLIENT = "client disconnected"

log = logging.getLogger("creditgate.proxy")


def _connection_tokens(headers: RawHeaders) -> set[bytes]:
    """Header names listed in Connection: hop-by-hop for this message only."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }


# The usual request's decision per sequence of header names (UpstreamProxy._lean_lines):
# (the format of all its lines: the kept ones, then X-Forwarded-For and -Proto (one value,
# after the request's own), then X-Forwarded-Host if it has a Host; what picks the values
# for it from the request's values and those two lines; the number of kept and Host lines;
# where Content-Length is or -1), or None for any other sequence. Bounded like the header
# policy's (gateway/core/headers.py): emptied when full, long sequences never kept.
_Usual = tuple[bytes, Callable[[tuple[bytes, ...]], tuple[bytes, ...]], int, int]
_USUAL: dict[tuple[bytes, ...], _Usual | None] = {}
_USUAL_MAX = 256
_USUAL_NAMES_MAX = 64
_UNKNOWN: Any = object()
# The usual request's X-Forwarded-For and X-Forwarded-Proto lines and their number, per
# (client address, scheme): a connection's requests share them. Bounded: emptied when full.
_TAILS: dict[tuple[Any, Any], tuple[bytes, int]] = {}
_TAILS_MAX = 1024
_NO_CLIENT: Any = object()  # the key's address when the scope has no client


def _usual_lines(names: tuple[bytes, ...]) -> _Usual | None:
    """The usual request's decision for ``names`` (see ``_USUAL``), kept for the next
    request with the same names; None when they are not the usual request's: a name not
    lowercase or with an underscore, a name twice, or a dropped one other than Host and
    Content-Length. Raises TypeError for a name that is not bytes (the caller declines)."""
    joined = b"\n".join(names)
    usual: _Usual | None = None
    if (
        b"_" not in joined
        and joined.lower() == joined
        and len(set(names)) == len(names)
        and _LEAN_DROP.intersection(names) <= _USUAL_DROP
    ):
        kept = [i for i, name in enumerate(names) if name not in _USUAL_DROP]
        # A % in a name (a token character) must not be taken for a conversion. The
        # X-Forwarded-For/-Proto lines come as one value after the request's own.
        template = b"".join(names[i].replace(b"%", b"%%") + b": %b\r\n" for i in kept) + b"%b"
        slots = [*kept, len(names)]
        if b"host" in names:
            template += b"x-forwarded-host: %b\r\n"
            slots.append(names.index(b"host"))
        pick: Callable[[tuple[bytes, ...]], tuple[bytes, ...]]
        if len(slots) == 1:
            only = slots[0]
            pick = lambda values: (values[only],)  # noqa: E731  # itemgetter(i) is no tuple
        else:
            pick = itemgetter(*slots)
        length_at = names.index(b"content-length") if b"content-length" in names else -1
        usual = (template, pick, len(slots) - 1, length_at)
    if len(names) <= _USUAL_NAMES_MAX and len(joined) <= 4096:
        if len(_USUAL) >= _USUAL_MAX:
            _USUAL.clear()
        _USUAL[names] = usual
    return usual


def _forwarded_tail(key: tuple[Any, Any], client: Any) -> tuple[bytes, int]:
    """The usual request's X-Forwarded-For (the client's address) and X-Forwarded-Proto
    lines and their number, for ``key``: (the client's address or ``_NO_CLIENT``, the
    scheme); kept in ``_TAILS`` when both are str."""
    lines, count = b"", 1
    if client:
        lines, count = b"x-forwarded-for: %b\r\n" % str(client[0]).encode("latin-1"), 2
    scheme = key[1]
    lines += _PROTO_LINES.get(scheme) or b"x-forwarded-proto: %b\r\n" % str(scheme).encode(
        "latin-1"
    )
    tail = (lines, count)
    if (key[0] is _NO_CLIENT or type(key[0]) is str) and type(scheme) is str:
        if len(_TAILS) >= _TAILS_MAX:
            _TAILS.clear()
        _TAILS[key] = tail
    return tail


_IDENTITY_HEADER = ("accept-encoding", "identity")
_IDENTITY_LINE = b"accept-encoding: identity\r\n"
_ACCEPT_ENCODING_LINE = b"accept-encoding:"
# The usual request's decision with Accept-Encoding: identity asked for (a usage cost's
# request: _identity_asked's answer made by the format itself, no search of the lines),
# per sequence of names, as _USUAL; None where _identity_asked decides on the lines made
# (the client sent an Accept-Encoding of its own, or the names are not the usual ones).
_USUAL_IDENTITY: dict[tuple[bytes, ...], _Usual | None] = {}


def _identity_lines(names: tuple[bytes, ...]) -> _Usual | None:
    """The usual request's decision for ``names`` (``_USUAL``'s) asking for an uncompressed
    answer: :func:`_identity_asked`'s answer for lines without an Accept-Encoding, the
    identity line last, one more line; kept in ``_USUAL_IDENTITY`` when the plain decision
    is kept in ``_USUAL``. None for names with an Accept-Encoding (its line must come out,
    and only when no CR or LF hides in it: :func:`_identity_asked` on the lines made)."""
    plain = _USUAL.get(names, _UNKNOWN)
    if plain is _UNKNOWN:
        plain = _usual_lines(names)
    usual: _Usual | None = None
    if plain is not None and b"accept-encoding" not in names:
        template, pick, count, length_at = plain
        usual = (template + _IDENTITY_LINE, pick, count + 1, length_at)
    if names in _USUAL:  # within the same bounds
        if len(_USUAL_IDENTITY) >= _USUAL_MAX:
            _USUAL_IDENTITY.clear()
        _USUAL_IDENTITY[names] = usual
    return usual


def _identity_asked(lean: tuple[bytes, int, int | None]) -> tuple[bytes, int, int | None]:
    """:meth:`UpstreamProxy._lean_lines`' answer asking for an uncompressed answer (a usage
    cost's request, ``ASKS_IDENTITY_ENCODING``): ``Accept-Encoding: identity`` last, the
    client's Accept-Encoding lines taken out. The names in the lines are lowercase; a
    line is taken out only when every CR and LF in them ends one of the ``lines`` (else
    frame() refuses the head whatever is done here, as the counts differ)."""
    block, lines, declared = lean
    # One search for the usual request, which has none (also finds a name that only ends
    # so, x-accept-encoding, for which the lines come out as they were).
    if (
        block.find(_ACCEPT_ENCODING_LINE) >= 0
        and block.count(b"\n") == lines
        and block.count(b"\r") == lines
    ):
        kept = [line for line in block.split(b"\r\n") if not line.startswith(_ACCEPT_ENCODING_LINE)]
        block = b"\r\n".join(kept)  # the last is the empty text after the last CRLF
        lines = len(kept) - 1
    return block + _IDENTITY_LINE, lines + 1, declared


async def _bad_gateway(send: Send, *, timed_out: bool) -> None:
    if timed_out:
        await send_problem(
            send,
            504,
            "upstream_timeout",
            "Gateway Timeout",
            "The upstream service did not answer in time.",
        )
    else:
        await send_problem(
            send,
            502,
            "bad_gateway",
            "Bad Gateway",
            "The upstream service is unavailable or broke off its answer.",
        )


class _Upload:
    """What the request-body generator tells the handler."""

    __slots__ = ("disconnected", "done")

    def __init__(self, done: bool) -> None:
        self.done = done
        self.disconnected = False


# The upload of a body that came whole in the first message (the usual request): nothing
# changes it, so every such request shares this one (never written to).
_WHOLE = _Upload(done=True)


class _AiohttpBackend:
    """One aiohttp ClientSession (and its connection pool) for one event loop."""

    TIMEOUT: Errors = (TimeoutError,)  # aiohttp's timeouts subclass it
    FAILURE: Errors = (aiohttp.ClientError, OSError)
    BUSY: Errors = ()  # aiohttp's wait for a pooled connection counts as connecting

    def __init__(
        self, timeout: float, connect_timeout: float, max_connections: int, pool_wait: float
    ) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_connections,
                limit_per_host=0,
                keepalive_timeout=_KEEPALIVE_S,
                ttl_dns_cache=60,
            ),
            # sock_read bounds the wait for headers and each gap between chunks, never the
            # whole exchange: a total timeout would cut long SSE streams.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=max(timeout, connect_timeout),
                sock_connect=connect_timeout,
                sock_read=timeout,
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
        )

    async def open(self, method: str, url: str, headers: Headers, body: Body) -> _AiohttpResp:
        # encoded=True: the path goes out byte for byte as the middleware normalised it.
        return _AiohttpResp(
            await self._session.request(
                method,
                URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                auto_decompress=False,
            )
        )

    async def aclose(self) -> None:
        await self._session.close()


class _AiohttpResp:
    __slots__ = ("_r", "content_length", "raw_headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._r, self.status, self.content_length = resp, resp.status, resp.content_length
        self.raw_headers: RawHeaders = list(resp.raw_headers)

    async def read(self) -> bytes:
        return await self._r.read()

    def chunks(self) -> AsyncIterator[bytes]:
        return self._r.content.iter_any()  # whatever has arrived: no line or size buffering

    async def aclose(self) -> None:
        self._r.release()  # pools a fully read connection, closes a half-read one


class _HttpxBackend:
    """One httpx AsyncClient for one event loop (slower: see bench/upstream_clients.py)."""

    def __init__(
        self, timeout: float, connect_timeout: float, max_connections: int, pool_wait: float
    ) -> None:
        import httpx  # only a test dependency of creditgate

        self.TIMEOUT: Errors = (httpx.TimeoutException,)
        self.FAILURE: Errors = (httpx.TransportError, OSError)
        self.BUSY: Errors = (httpx.PoolTimeout,)  # a TimeoutException: checked first
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=pool_wait),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=_KEEPALIVE_S,
            ),
            follow_redirects=False,
            trust_env=False,
            # Refuse every cookie: one shared client must not carry a caller's cookies
            # into another caller's requests.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )

    async def open(self, method: str, url: str, headers: Headers, body: Body) -> _HttpxResp:
        import httpx

        # A bare Request has none of the client's default headers (User-Agent, Accept...).
        request = httpx.Request(method, url, headers=headers, content=body)
        return _HttpxResp(await self._client.send(request, stream=True))

    async def aclose(self) -> None:
        await self._client.aclose()


class _HttpxResp:
    __slots__ = ("_r", "content_length", "raw_headers", "status")

    def __init__(self, resp: httpx.Response) -> None:
        self._r, self.status = resp, resp.status_code
        self.raw_headers: RawHeaders = list(resp.headers.raw)
        length = resp.headers.get("content-length", "")
        self.content_length = int(length) if length.isdigit() else None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self._r.aiter_raw()])  # not decompressed

    def chunks(self) -> AsyncIterator[bytes]:
        return self._r.aiter_raw()

    async def aclose(self) -> None:
        await self._r.aclose()


_Backend = _AiohttpBackend | _HttpxBackend | LeanBackend
_Resp = _AiohttpResp | _HttpxResp | LeanResponse
Client = Literal["lean", "aiohttp", "httpx"]
CLIENTS: tuple[Client, ...] = ("lean", "aiohttp", "httpx")


class UpstreamProxy:
    """ASGI app forwarding every HTTP request to ``upstream`` (which may carry a base path).

    ``timeout`` bounds the wait for the response headers and each gap between body chunks;
    ``connect_timeout`` the TCP connect. One client session per event loop is created on
    first use and closed on ASGI lifespan shutdown or :meth:`aclose`.

    ``client`` picks the HTTP client: ``lean`` (gateway/proxy/lean_client.py, the default and
    the cheapest in CPU), ``aiohttp`` or ``httpx``. An upstream URL with credentials in it
    (``http://user:pass@host``) is served by aiohttp, which the lean client leaves out.

    ``max_connections`` bounds the upstream connections per event loop (config
    ``upstream_max_connections``; each stream holds one for its whole length); a request
    beyond them waits up to ``pool_wait`` seconds, then gets 503 with ``Retry-After:
    retry_after``.
    """

    drains_usage: ClassVar[bool] = True
    """It keeps reading a usage-metered answer whose client left (``USAGE_DRAIN_SECONDS``,
    :meth:`_respond_draining`): the metering middleware in front then hands it the client's
    disconnect at once (gateway/core/scope_keys.py ``DRAINS_USAGE``)."""

    asks_identity_encoding: ClassVar[bool] = True
    """On a usage-cost request (``USAGE_TAP`` declared) it asks the upstream for an
    uncompressed answer itself, ``Accept-Encoding: identity`` in place of the client's, in
    the head it builds (:func:`_identity_asked`): the metering middleware in front then does
    not copy the request's headers to ask for it (gateway/core/scope_keys.py
    ``ASKS_IDENTITY_ENCODING``)."""

    reads_usage_request: ClassVar[bool] = True
    """It reads the request body anyway and asks an OpenAI stream for its usage when the
    usage tap says so (``USAGE_TAP``'s request element, :meth:`_http`): the metering
    middleware in front then leaves the body to it (gateway/core/scope_keys.py
    ``READS_USAGE_REQUEST``) instead of reading it first and replaying it."""

    def __init__(
        self,
        upstream: str,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        max_buffered_body: int = 65536,
        client: Client = "lean",
        max_connections: int = 10_000,
        pool_wait: float = 5.0,
        retry_after: int = 5,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"upstream must be an http(s) URL, got {upstream!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"upstream may not have a query or fragment: {upstream!r}")
        if client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}, got {client!r}")
        if client == "lean" and "@" in parts.netloc:
            client = "aiohttp"
        if client == "httpx" and importlib.util.find_spec("httpx") is None:
            raise ValueError("client 'httpx' needs the httpx package (pip install httpx)")
        self.upstream = upstream
        self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._max_buffered = max_buffered_body
        self.client: Client = client
        self._client_cls: type[_Backend] = {
            "lean": LeanBackend,
            "aiohttp": _AiohttpBackend,
            "httpx": _HttpxBackend,
        }[client]
        self._client_args = (timeout, connect_timeout, max_connections, pool_wait)
        self._retry_after = retry_after
        self._backends: dict[asyncio.AbstractEventLoop, _Backend] = {}
        # The lean client's fast path builds the request head here, in bytes: the target's
        # base path and the Host line are the same for every request.
        self._origin: Origin | None = None
        if client == "lean":
            self._origin = origin_of(parts.scheme, parts.netloc)
            self._base_path = parts.path.rstrip("/").encode("latin-1")
            self._host = self._origin.host_header.encode("latin-1")

    def _backend(self) -> _Backend:
        loop = running_loop()  # asyncio.get_running_loop() without its getpid() (3.11)
        backend = self._backends.get(loop)
        if backend is None:
            for old in [lp for lp in self._backends if lp.is_closed()]:
                del self._backends[old]  # its loop is gone; nothing left to close
            backend = self._backends[loop] = self._client_cls(*self._client_args)
        return backend

    async def aclose(self) -> None:
        """Close this event loop's client session (a later request opens a new one)."""
        backend = self._backends.pop(asyncio.get_running_loop(), None)
        if backend is not None:
            await backend.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.aclose()
            await send({"type": "lifespan.shutdown.complete"})
        else:  # websockets are not proxied; closing before accept answers 403
            await receive()
            await send({"type": "websocket.close", "code": 1008})

    def _url(self, scope: Scope) -> str:
        raw_path: bytes | None = scope.get("raw_path")
        path = (
            raw_path.decode("latin-1") if raw_path else quote(scope["path"], safe="/:@!$&'()*+,;=~")
        )
        query: bytes = scope.get("query_string", b"")
        return f"{self._base}{path}?{query.decode('latin-1')}" if query else self._base + path

    @staticmethod
    def _request_headers(scope: Scope) -> tuple[Headers, int | None]:
        """Headers for the upstream, and the declared Content-Length (None if unknown)."""
        raw: RawHeaders = scope["headers"]
        named = _connection_tokens(raw)
        out: Headers = []
        forwarded_for: list[str] = []
        host = length = None
        chunked = False
        for name, value in raw:
            lname = name.lower()
            # Some servers merge X_HTTP_Method_Override with the dash spelling: drop both.
            key = lname.replace(b"_", b"-") if b"_" in lname else lname
            # The middleware's identity headers stay even when a client names them in
            # Connection.
            if key in _REQUEST_DROP or (lname in named and not lname.startswith(OURS_PREFIX)):
                if lname == b"x-forwarded-for":
                    forwarded_for.append(value.decode("latin-1"))
                elif lname == b"host":
                    host = value.decode("latin-1")
                chunked = chunked or lname == b"transfer-encoding"
                continue
            if lname == b"content-length":
                length = value
            out.append((lname.decode("latin-1"), value.decode("latin-1")))
        declared = int(length) if length is not None and length.isdigit() else None
        if chunked and length is not None:
            # Both framings at once is a smuggling attempt: the body we relay was framed by
            # chunking, so a forwarded Content-Length would desynchronise the upstream.
            out = [(n, v) for n, v in out if n != "content-length"]
            declared = None
        if client := scope.get("client"):
            forwarded_for.append(str(client[0]))
        if forwarded_for:
            out.append(("x-forwarded-for", ", ".join(forwarded_for)))
        out.append(("x-forwarded-proto", str(scope.get("scheme", "http"))))
        if host is not None:
            out.append(("x-forwarded-host", host))
        return out, declared

    @staticmethod
    def _lean_lines(
        scope: Scope, decisions: dict[tuple[bytes, ...], _Usual | None] = _USUAL
    ) -> tuple[bytes, int, int | None] | None:
        """What :meth:`_request_headers` forwards, for the lean client: the header lines
        as bytes (``name: value\\r\\n``, no Content-Length), their number, and the declared
        Content-Length (None if unknown). The same headers in the same order, found with
        set, tuple and dict operations (C) instead of a Python loop per header; None (use
        :meth:`_request_headers`) when a name is not lowercase, has an underscore, a
        header is not a 2-tuple of bytes, or Content-Length comes twice.

        What to do with a request's headers depends on their names alone but for the
        values kept, Host and Content-Length: for the usual request (no name twice, of the
        dropped ones only Host and Content-Length) the decision is kept per sequence of
        names (:func:`_usual_lines`), and the lines are one format of the values kept.

        ``decisions``: ``_USUAL_IDENTITY`` for a usage cost's request, the lines then asking for
        an uncompressed answer (:func:`_identity_asked`'s answer, :func:`_identity_lines`)."""
        raw: RawHeaders = scope["headers"]
        try:
            names, values = zip(*raw, strict=True) if raw else ((), ())
            usual = decisions.get(names, _UNKNOWN)
            if usual is _UNKNOWN:
                usual = _usual_lines(names) if decisions is _USUAL else _identity_lines(names)
            if usual is not None:
                template, pick, count, length_at = usual
                client = scope.get("client")
                key = (client[0] if client else _NO_CLIENT, scope.get("scheme", "http"))
                tail = _TAILS.get(key)
                if tail is None:
                    tail = _forwarded_tail(key, client)
                length = values[length_at] if length_at >= 0 else None
                declared = int(length) if length is not None and length.isdigit() else None
                # All the lines in one format (frame() checks every CR and LF): the kept
                # ones, X-Forwarded-For and -Proto, X-Forwarded-Host.
                return template % pick((*values, tail[0])), count + tail[1], declared
            if decisions is not _USUAL:  # identity asked on lines the format does not make
                lean = UpstreamProxy._lean_lines(scope)
                return None if lean is None else _identity_asked(lean)
            # The general road (the usual request returned above).
            forwarded_for: list[bytes] = []
            joined = b"\n".join(names)
            if b"_" in joined or joined.lower() != joined:
                return None
            drop: frozenset[bytes] | set[bytes] = _LEAN_DROP.intersection(names)
            if names.count(b"content-length") > 1:
                return None  # the general path says which one counts, for what
            length = host = None
            by_connection = False
            if b"connection" in drop:
                # Named in Connection: hop-by-hop, except the middleware's own headers.
                named = _connection_tokens(raw)
                drop = drop.union(n for n in named if not n.startswith(OURS_PREFIX))
                by_connection = b"content-length" in named
            if b"content-length" in drop and not by_connection:
                length = values[names.index(b"content-length")]
            if b"x-forwarded-for" in drop:
                forwarded_for = [v for n, v in raw if n == b"x-forwarded-for"]
            if b"host" in drop:
                host = values[len(names) - 1 - names[::-1].index(b"host")]
            kept = [h for h in raw if h[0] not in drop]
            count = len(kept)
            block = [b"\r\n".join(map(b": ".join, kept)) + b"\r\n"] if count else []
            if host is not None:
                host_line = b"x-forwarded-host: %b\r\n" % host
        except (TypeError, ValueError, AttributeError):
            return None
        declared = int(length) if length is not None and length.isdigit() else None
        if b"transfer-encoding" in drop:
            # Both framings at once is a smuggling attempt: the body we relay was framed by
            # chunking, so the upstream must not be told a Content-Length.
            declared = None
        if client := scope.get("client"):
            forwarded_for.append(str(client[0]).encode("latin-1"))
        if forwarded_for:
            block.append(b"x-forwarded-for: %b\r\n" % b", ".join(forwarded_for))
            count += 1
        scheme = scope.get("scheme", "http")
        block.append(
            _PROTO_LINES.get(scheme) or b"x-forwarded-proto: %b\r\n" % str(scheme).encode("latin-1")
        )
        if host is not None:
            block.append(host_line)
            count += 1
        return b"".join(block), count + 1, declared

    def _lean_target(self, scope: Scope) -> bytes:
        """The request target for the lean client: what :meth:`_url` gives after the origin."""
        raw_path: bytes | None = scope.get("raw_path")
        path = raw_path or quote(scope["path"], safe="/:@!$&'()*+,;=~").encode("latin-1")
        query: bytes = scope.get("query_string", b"")
        target = self._base_path + path + b"?" + query if query else self._base_path + path
        return target if target.startswith(b"/") else b"/" + target

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.setdefault("state", {})
        # A usage tap in front (USAGE_TAP): what it offers for the request and the answer.
        tap = state.get(USAGE_TAP)
        # A usage cost's answer must be readable: Accept-Encoding: identity asked for.
        if self._origin is None:
            lean = None
        elif tap is None:
            lean = self._lean_lines(scope)
        else:
            lean = self._lean_lines(scope, _USUAL_IDENTITY)
        if lean is None:
            headers, declared = self._request_headers(scope)
            if tap is not None:
                headers = [h for h in headers if h[0] != "accept-encoding"]
                headers.append(_IDENTITY_HEADER)
        else:
            declared = lean[2]
        first = await receive()
        if first["type"] == "http.disconnect":
            state[CLIENT_DISCONNECTED] = True
            return
        if tap is not None and tap[2] is not None:
            # The request body as the tap would have sent it (include_usage asked for).
            given = first
            if first.get("more_body", False):
                taken = await tap[2][1](scope, first, receive)
                if taken is None:
                    state[CLIENT_DISCONNECTED] = True
                    return
                first, receive = taken
            else:
                first = tap[2][0](first)
            if first is not given and not first.get("more_body", False):
                # A body of its own length now: the lean client frames bytes by their
                # length, the others are told it.
                declared = len(first.get("body", b""))
                if lean is None:
                    headers = [(n, v) for n, v in headers if n != "content-length"]
                    headers.append(("content-length", str(declared)))
        chunk: bytes = first.get("body", b"")
        body: Body = chunk or None
        if not first.get("more_body", False):
            upload = _WHOLE  # the usual request: its body came whole
        elif declared is not None and declared <= self._max_buffered:
            upload = _Upload(done=False)
            buffer = bytearray(chunk)  # small and of known size: one write upstream is cheaper
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    state[CLIENT_DISCONNECTED] = True
                    return
                buffer += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            body, upload.done = bytes(buffer), True
        else:
            upload = _Upload(done=False)
            body = self._stream_body(chunk, receive, upload)

        backend = self._backend()
        started = time.perf_counter()
        try:
            if lean is None:
                resp = await backend.open(scope["method"], self._url(scope), headers, body)
            else:
                if TYPE_CHECKING:  # (no isinstance per request: lean is only made for it)
                    assert isinstance(backend, LeanBackend) and self._origin is not None
                method: str = scope["method"]
                head, length = frame(
                    method, self._lean_target(scope), lean[0], lean[1], self._host, declared, body
                )
                resp = await backend.exchange(self._origin, method, head, length, body)
        except backend.BUSY as exc:  # before TIMEOUT: httpx's PoolTimeout is one
            state[UPSTREAM_ERROR] = f"upstream connections busy: {exc}"
            await send_problem(
                send, 503, "unavailable", "Service Unavailable",
                "Every upstream connection of this gateway is busy; retry shortly.",
                retry_after=self._retry_after,
            )  # fmt: skip
            return
        except backend.TIMEOUT:
            state[UPSTREAM_ERROR] = "timeout waiting for the upstream's response headers"
            await _bad_gateway(send, timed_out=True)
            return
        except backend.FAILURE as exc:
            if upload.disconnected:  # nobody to answer, but a 5xx tells the meter: refund
                state[CLIENT_DISCONNECTED] = True
                state[UPSTREAM_ERROR] = "client disconnected during the request body"
            else:
                state[UPSTREAM_ERROR] = f"upstream unavailable: {type(exc).__name__}: {exc}"
            await _bad_gateway(send, timed_out=False)
            return
        state[UPSTREAM_STATUS] = resp.status
        state[UPSTREAM_LATENCY_MS] = (time.perf_counter() - started) * 1000.0
        try:
            await self._respond(scope, resp, backend, receive, send, upload, tap)
        finally:
            if isinstance(resp, LeanResponse):
                resp.close()  # its aclose() without a coroutine of its own
            else:
                await resp.aclose()

    @staticmethod
    async def _stream_body(first: bytes, receive: Receive, upload: _Upload) -> AsyncIterator[bytes]:
        if first:
            yield first
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                upload.disconnected = True
                raise ConnectionResetError("client disconnected during the request body")
            if chunk := message.get("body", b""):
                yield chunk
            if not message.get("more_body", False):
                upload.done = True
                return

    async def _respond(
        self,
        scope: Scope,
        resp: _Resp,
        backend: _Backend,
        receive: Receive,
        send: Send,
        upload: _Upload,
        tap: tuple[Any, ...] | None = None,
    ) -> None:
        """Relay the upstream's answer; ``tap``: the usage tap's offer (``USAGE_TAP``)."""
        state = scope["state"]
        lean = resp if isinstance(resp, LeanResponse) else None
        if lean is not None and HOP_BY_HOP.isdisjoint(lean.lower_names):
            # The usual answer (no Connection header, so nothing named in it either): the
            # lean client lowercased the names already; pair them with the values in C.
            headers = list(zip(lean.lower_names, lean.values, strict=True))
        else:
            named = _connection_tokens(resp.raw_headers)
            headers = [
                (lname, value)
                for name, value in resp.raw_headers
                if (lname := name.lower()) not in HOP_BY_HOP and lname not in named
            ]
        status = resp.status
        start = {"type": "http.response.start", "status": status, "headers": headers}
        if status in (204, 304) or status < 200 or scope["method"] == "HEAD":
            await send(start)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if resp.content_length is not None and resp.content_length <= self._max_buffered:
            try:  # read before answering: a failure here can still become a 502/504
                # The usual short answer came whole: taken without read()'s coroutine.
                data = lean.read_now() if lean is not None else None
                if data is None:
                    data = await resp.read()
            except backend.TIMEOUT:
                state[UPSTREAM_ERROR] = "timeout reading the upstream's response body"
                await _bad_gateway(send, timed_out=True)
                return
            except backend.FAILURE as exc:
                state[UPSTREAM_ERROR] = f"upstream body failed: {type(exc).__name__}: {exc}"
                await _bad_gateway(send, timed_out=False)
                return
            # A usage tap in between takes the whole answer in one call (USAGE_TAP) and
            # says where both messages go: past it (read and headed), through it, or nowhere.
            if tap is not None and tap[0] is send:
                target = tap[1](start, data)
                if target is None:
                    return
                send = target
            await send(start)
            await send({"type": "http.response.body", "body": data, "more_body": False})
            return

        await send(start)
        # After the start: a usage tap in between says only now what it needs of the body.
        splice = splice_for(scope, send) if isinstance(resp, LeanResponse) else None
        if splice is not None and not splice.ready():
            splice = None
        drain = state.get(USAGE_DRAIN_SECONDS)
        if drain:  # a usage-metered request
            error = await self._respond_draining(
                resp, backend, receive, send, upload, state, drain, splice
            )
            if error is None:  # the end, also when the client left: the tap reads it
                with contextlib.suppress(OSError):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif error is _CLIENT:
                state[CLIENT_DISCONNECTED] = True
            else:
                state[UPSTREAM_ERROR] = error
                log.warning("upstream response cut short after the headers: %s", error)
            return
        if splice is not None:
            relay = asyncio.create_task(self._splice(resp, splice))  # type: ignore[arg-type]
        else:
            relay = asyncio.create_task(self._relay(resp, backend, send))
        # Once the request body is in, receive() can only return http.disconnect: watch for
        # it so an idle stream (an SSE pause) is dropped at once, not at its next chunk.
        watch = asyncio.create_task(_wait_disconnect(receive)) if upload.done else None
        tasks = [relay] if watch is None else [relay, watch]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # A cancelled relay means the watcher saw http.disconnect.
        error = _CLIENT if relay.cancelled() else relay.result()
        if error is _CLIENT:
            state[CLIENT_DISCONNECTED] = True
            return
        if error is not None:
            # The status line is gone, so the failure can only be told by not ending the
            # body: the app returns with the response incomplete and the server closes the
            # connection (uvicorn does; nginx does the same on a premature upstream close).
            # A final chunk here would make a cut-off answer look complete to the client.
            # The tokens are refunded all the same (the middleware reads UPSTREAM_ERROR).
            state[UPSTREAM_ERROR] = error
            log.warning("upstream response cut short after the headers: %s", error)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _relay(
        resp: _Resp, backend: _Backend, send: Send, left: asyncio.Future[None] | None = None
    ) -> str | None:
        """Copy body chunks as they arrive; return None, an error description or _CLIENT.

        With ``left`` (a request that wants draining), a ``send`` that raises for a gone
        client sets ``left`` and the relay goes on: the chunks still reach the metering
        middleware's tap, which forwards nothing once ``CLIENT_DISCONNECTED`` is set."""
        chunks = resp.chunks()
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return None
            except backend.TIMEOUT:
                return "timeout between chunks of the upstream's response body"
            except backend.FAILURE as exc:
                return f"upstream body failed: {type(exc).__name__}: {exc}"
            if chunk:
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:  # servers that raise for a gone client rather than drop
                    if left is None:
                        return _CLIENT
                    if not left.done():
                        left.set_result(None)

    @staticmethod
    async def _splice(resp: LeanResponse, splice: ResponseSplice) -> str | None:
        """The body through the response splice; return None or an error description.

        Every piece goes to the client from the upstream connection's ``data_received``;
        this coroutine only wakes up at the end, on a failure, or when the client's buffer
        is full (reading from the upstream is then paused until it drains, so a slow
        client holds at most its transport's buffer plus one read in memory)."""
        resp.splice(splice.write)
        try:
            while not resp.complete:
                if resp.reading_paused:
                    await splice.drain()
                    resp.resume_reading()
                else:
                    await resp.wait()
        except TimeoutError:  # the lean client's TIMEOUT
            return "timeout between chunks of the upstream's response body"
        except OSError as exc:  # its FAILURE
            return f"upstream body failed: {type(exc).__name__}: {exc}"
        finally:
            resp.sink = None  # cancelled (the client left) or done: no more pieces to it
        return None

    async def _respond_draining(
        self,
        resp: _Resp,
        backend: _Backend,
        receive: Receive,
        send: Send,
        upload: _Upload,
        state: dict[str, Any],
        drain: float,
        splice: ResponseSplice | None = None,
    ) -> str | None:
        """The relay of a request that wants draining (``USAGE_DRAIN_SECONDS``): a client
        that leaves (seen by ``receive``, or by ``send`` raising) sets
        ``CLIENT_DISCONNECTED`` and leaves the relay ``drain`` more seconds instead of
        ending it. Returns None (the body ended), ``_CLIENT`` (the drain ran out first) or
        an error description. The relay runs in a task of its own, as in ``_respond``: a
        resume of the request's task passes through every frame of the middleware.

        With ``splice`` the pieces go through it instead (the tap observes each one, also
        after the client left: the splice drops only the write), and ``left`` stays unset:
        the watcher on ``receive`` tells the disconnect, as for a server that drops the
        sends to a gone client."""
        left: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if splice is not None:
            relay = asyncio.create_task(self._splice(resp, splice))  # type: ignore[arg-type]
        else:
            relay = asyncio.create_task(self._relay(resp, backend, send, left))
        watch = asyncio.create_task(_wait_disconnect(receive)) if upload.done else None
        waiting: list[asyncio.Future[Any]] = (
            [relay, left] if watch is None else [relay, left, watch]
        )
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if relay not in done:  # the client left: keep reading, for at most `drain`
                state[CLIENT_DISCONNECTED] = True
                await asyncio.wait([relay], timeout=drain)
        finally:
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        if relay.cancelled():
            log.info("stopped reading an upstream body %.1f s after its client left", drain)
            return _CLIENT
        return relay.result()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass

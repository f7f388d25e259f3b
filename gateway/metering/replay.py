"""Idempotency-Key over HTTP (contract A9): the pieces the middleware's idempotent path is
built of, in both modes (the proxy is the middleware in front of ``UpstreamProxy``).

A metered request that carries an ``Idempotency-Key`` takes its own branch of
:class:`~gateway.metering.middleware.CreditGateMiddleware` (a request without one never
comes here and pays nothing for it):

1. :func:`read_for_fingerprint` reads the request body, at most
   :data:`~gateway.metering.usage_tap.REQUEST_BODY_LIMIT` bytes of it, keeping the ASGI
   messages so that the app still receives the body unchanged (replayed by ``TapReceive``);
2. :func:`fingerprint_of` hashes what makes a repeat the same request: method, the
   normalised path with its query string, and the body. A body larger than the limit is
   fingerprinted by its first ``REQUEST_BODY_LIMIT`` bytes and its declared length, so
   reading it stays bounded and the fingerprint does not depend on how it was chunked;
3. admission (lua/charge.lua) compares the fingerprint under the org's key: ``ok``,
   ``replay``, ``reused`` (422) or ``in_flight`` (409 + ``Retry-After``);
4. on ``ok``, :class:`ResponseCapture` wraps ``send`` and keeps the response as the client
   got it; the settle stores it (``StoredResponse``) only when the request was charged: a
   refunded request's settle deletes the key (lua/settle.lua), so the client's retry is
   forwarded and charged like a first request;
5. on ``replay`` with a stored response, :func:`send_replay` answers it without the app.

Which response headers are stored is :data:`~gateway.metering.admission.UNSAFE_REPLAY_HEADERS`
(the one list; every ``x-creditgate-*`` is left out too). The body is stored up to
``idempotency_max_body_bytes``; a larger body, or a streamed one (:data:`STREAMED_TYPES`,
a file response), is stored as a marker and its repeats get 409 ``idempotency_conflict``.
"""

from __future__ import annotations

from typing import Final

from starlette.types import Message, Receive, Scope, Send

from gateway.metering.admission import StoredResponse, request_fingerprint
from gateway.metering.usage_tap import REQUEST_BODY_LIMIT, RequestRead

__all__ = [
    "REPLAY_HEADERS",
    "STREAMED_TYPES",
    "ResponseCapture",
    "fingerprint_of",
    "read_for_fingerprint",
    "send_replay",
]

Header = tuple[bytes, bytes]

STREAMED_TYPES: Final = frozenset({b"text/event-stream"})
"""Response media types that are a stream, never stored for a replay whatever their size:
an event stream is a live answer, not a document to give back."""

REPLAY_HEADERS: Final[tuple[Header, ...]] = (
    (b"idempotent-replayed", b"true"),
    (b"x-tokens-cost", b"0"),
)
"""What creditgate adds to a replayed response: it is a replay, and nothing was charged
(no ``X-Tokens-Remaining`` nor ``RateLimit-*``: the replay neither read the balance nor
consumed a limit)."""

_CONTENT_TYPE = b"content-type"
_CONTENT_LENGTH = b"content-length"
# Statuses that never carry a Content-Length (RFC 9110 8.6).
_NO_CONTENT = frozenset({204, 304})
# ASGI extensions that send a file by path: nothing passes through send to be kept.
_FILE_SENDS = frozenset({"http.response.pathsend", "http.response.zerocopysend"})


async def read_for_fingerprint(
    receive: Receive, limit: int = REQUEST_BODY_LIMIT
) -> tuple[RequestRead, bytes]:
    """Read the request body for its fingerprint: ``(read, fingerprinted)``.

    ``read.messages`` are the ASGI messages received (give them to the app first);
    ``read.body`` the whole body when it ended within ``limit`` bytes, else None (the rest
    is left in ``receive``); ``read.disconnected`` when the client left first.
    ``fingerprinted`` is the body, or for a larger one its first ``limit`` bytes.

    Unlike :func:`~gateway.metering.usage_tap.read_request`, a body declared larger than
    ``limit`` is still read up to ``limit``: the fingerprint must not depend on where the
    client's chunks happened to end.
    """
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            disconnected = message["type"] == "http.disconnect"
            return RequestRead(messages, None, disconnected), b"".join(chunks)[:limit]
        messages.append(message)
        chunk: bytes = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
        if not message.get("more_body", False):
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if size <= limit:
                return RequestRead(messages, body, False), body
            return RequestRead(messages, None, False), body[:limit]
        if size > limit:
            return RequestRead(messages, None, False), b"".join(chunks)[:limit]


def fingerprint_of(scope: Scope, path: str, read: RequestRead, fingerprinted: bytes) -> str:
    """The fingerprint of a request (:func:`request_fingerprint`): its method, ``path``
    (normalised, as matched and forwarded) with the query string, and its body; a body past
    the read limit by its first bytes and the declared ``Content-Length`` (or none: the
    marker keeps the two forms from ever colliding, a whole body being at most the limit)."""
    query: bytes = scope.get("query_string", b"")
    target = f"{path}?{query.decode('latin-1')}" if query else path
    if read.body is not None:
        return request_fingerprint(scope["method"], target, fingerprinted)
    declared = b""
    for name, value in scope["headers"]:
        if name.lower() == _CONTENT_LENGTH:
            declared = value
            break
    marked = b"\0partial\0" + declared + b"\0" + fingerprinted
    return request_fingerprint(scope["method"], target, marked)


class ResponseCapture:
    """``send`` for an idempotent request: passes every message on and keeps the response
    as the client gets it, for :meth:`stored`.

    The body is kept up to ``max_body`` bytes; past that, or for a stream, only the fact
    that it cannot be replayed is kept.
    """

    __slots__ = ("_chunks", "_max", "_send", "_size", "complete", "headers", "status", "streamed")

    def __init__(self, send: Send, max_body: int) -> None:
        self._send = send
        self._max = max_body
        self._chunks: list[bytes] = []
        self._size = 0
        self.status = 0
        self.headers: list[Header] = []
        self.streamed = False
        self.complete = False

    async def send(self, message: Message) -> None:
        """Keep what ``message`` says of the response, then send it."""
        kind = message["type"]
        if kind == "http.response.body":
            body: bytes = message.get("body", b"")
            if body and not self.streamed:
                self._size += len(body)
                if self._size <= self._max:
                    self._chunks.append(body)
                else:
                    self._chunks.clear()  # too large: only its size matters from here
            if not message.get("more_body", False):
                self.complete = True
        elif kind == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
            for name, value in self.headers:
                if name.lower() == _CONTENT_TYPE:
                    media = value.split(b";", 1)[0].strip().lower()
                    self.streamed = media in STREAMED_TYPES
        elif kind in _FILE_SENDS:
            self.streamed = self.complete = True
        await self._send(message)

    def stored(self) -> StoredResponse:
        """The response to keep under the key: status, safe headers and body, or the marker
        of one that cannot be replayed (streamed, incomplete, larger than the limit)."""
        if self.streamed or not self.complete:
            return StoredResponse(self.status, unreplayable="streamed")
        if self._size > self._max:
            return StoredResponse(self.status, unreplayable="too_large")
        return StoredResponse.capture(
            self.status, self.headers, b"".join(self._chunks), max_body=self._max
        )


async def send_replay(send: Send, stored: StoredResponse) -> None:
    """Answer with ``stored``: the same status, safe headers and body as the first time,
    a ``Content-Length`` for that body, and :data:`REPLAY_HEADERS`."""
    headers = list(stored.headers)
    if stored.status not in _NO_CONTENT:
        headers.append((_CONTENT_LENGTH, str(len(stored.body)).encode("ascii")))
    headers += REPLAY_HEADERS
    await send({"type": "http.response.start", "status": stored.status, "headers": headers})
    await send({"type": "http.response.body", "body": stored.body, "more_body": False})

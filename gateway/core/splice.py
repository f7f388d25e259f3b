"""The response splice: an ASGI extension through which a streaming app writes body bytes
to the client without one ASGI ``send`` per piece.

An SSE stream relayed through ASGI costs, per event, a task step and a future in the
relay, the metering middleware's ``send`` wrapper and the server's ``send`` (framing plus
``transport.write``). With the splice the proxy hands each upstream body piece to the
client's transport from inside the upstream connection's ``data_received``: no task step,
no future, no ``send`` (docs/ARCHITECTURE.md, "Streams: the splice").

The server offers it: ``creditgate serve``'s HTTP protocol
(gateway/commands/limited_protocol.py) puts a :class:`ResponseSplice` for each request in
``scope["extensions"][RESPONSE_SPLICE]`` (gateway/commands/splice.py implements it over
uvicorn's httptools protocol). Any other server offers none, and the app keeps to plain
ASGI.

Using it bypasses everything between the app and the server for the body pieces, so an app
may use it only when its ``send`` reaches the server's unchanged, or through wrappers that
declared they need no body piece: :func:`splice_for` checks that. The response's start and
its end still go through ``send`` (the middleware sees the status, adds its headers and
sees the end), only the pieces in between are spliced.

A wrapper that must read the body without changing it (the usage tap of a usage-cost
stream: it scans the SSE events for the usage) declares an observer instead of giving up
the splice: a synchronous callable the splice hands every piece to, in order, before the
client's transport gets it, also after the client left (a drained stream's usage still
counts).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

__all__ = [
    "RESPONSE_SPLICE",
    "SEND_PASSES_BODY",
    "BodyObserver",
    "ObserverFor",
    "ResponseSplice",
    "splice_for",
]

RESPONSE_SPLICE = "creditgate.response_splice"
"""The name of the extension in ``scope["extensions"]``; its value is a ResponseSplice."""

SEND_PASSES_BODY = "creditgate.send_passes_body"
"""``scope["state"]`` key: ``(wrapper, wrapped)``, set by a middleware whose ``send``
wrapper hands every ``http.response.body`` message with ``more_body=True`` to ``wrapped``
unchanged and needs to see none of them (the metering middleware's fixed-cost path: it
looks only at the start). The app may then splice around ``wrapper``.

Or ``(wrapper, wrapped, observer_for)``: a wrapper that must see the pieces but changes
none of them (the usage tap). ``observer_for()`` is called once, after the response's start
went through ``wrapper``, and says what the wrapper needs of the body from then on: True
(nothing: splice freely), False (every piece through ``send``: no splice), or a
:data:`BodyObserver` the splice must hand every piece to."""

BodyObserver = Callable[[bytes], None]
"""Sees each body piece, in order, before the client does (also once the client left); it
must not raise: it runs inside the upstream connection's ``data_received``."""

ObserverFor = Callable[[], "BodyObserver | bool"]
"""The third element of a ``SEND_PASSES_BODY`` declaration (see there)."""


class ResponseSplice(Protocol):
    """Body bytes straight to the client's connection, framed as the server frames them."""

    def is_server_send(self, send: Callable[..., Awaitable[None]]) -> bool:
        """Whether ``send`` is the server's own ``send`` of this request."""

    def ready(self) -> bool:
        """The response has started, with a framing the splice can write (chunked), is not
        complete, and the client is still connected: call once after sending the start."""

    def write(self, data: bytes) -> bool:
        """Write one non-empty body piece (framed) to the client. Returns False when the
        client's buffer is full: the caller stops its source until :meth:`drain`. A piece
        written after the client left is dropped (the app learns of it from ``receive``)."""

    async def drain(self) -> None:
        """Until the client's buffer has room again (or the client left)."""

    def observe(self, observer: BodyObserver) -> None:
        """Hand every piece written from now on to ``observer`` first (one observer)."""


def splice_for(scope: MutableMapping[str, Any], send: Callable[..., Awaitable[None]]) -> (
    ResponseSplice | None
):  # fmt: skip
    """The request's splice when the server offers one and ``send`` passes body pieces
    through unchanged (the server's own, or a wrapper declared in ``SEND_PASSES_BODY``
    around it), else None: the app then sends every piece through ``send``.

    Call it once the response's start went through ``send``: a declared observer is asked
    for then (the wrapper knows from the start what it needs of the body) and, when there
    is one, installed on the splice returned."""
    extensions = scope.get("extensions")
    if not extensions:
        return None
    splice: ResponseSplice | None = extensions.get(RESPONSE_SPLICE)
    if splice is None:
        return None
    if splice.is_server_send(send):
        return splice
    declared = scope.get("state", {}).get(SEND_PASSES_BODY)
    if declared is None or declared[0] is not send or not splice.is_server_send(declared[1]):
        return None
    if len(declared) > 2:
        observer = declared[2]()
        if observer is False:
            return None  # the wrapper needs every piece through send (it holds or copies)
        if observer is not True:
            splice.observe(observer)
    return splice

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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

__all__ = ["RESPONSE_SPLICE", "SEND_PASSES_BODY", "ResponseSplice", "splice_for"]

RESPONSE_SPLICE = "creditgate.response_splice"
"""The name of the extension in ``scope["extensions"]``; its value is a ResponseSplice."""

SEND_PASSES_BODY = "creditgate.send_passes_body"
"""``scope["state"]`` key: ``(wrapper, wrapped)``, set by a middleware whose ``send``
wrapper hands every ``http.response.body`` message with ``more_body=True`` to ``wrapped``
unchanged and needs to see none of them (the metering middleware's fixed-cost path: it
looks only at the start). The app may then splice around ``wrapper``."""


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


def splice_for(scope: MutableMapping[str, Any], send: Callable[..., Awaitable[None]]) -> (
    ResponseSplice | None
):  # fmt: skip
    """The request's splice when the server offers one and ``send`` passes body pieces
    through unchanged (the server's own, or a wrapper declared in ``SEND_PASSES_BODY``
    around it), else None: the app then sends every piece through ``send``."""
    extensions = scope.get("extensions")
    if not extensions:
        return None
    splice: ResponseSplice | None = extensions.get(RESPONSE_SPLICE)
    if splice is None:
        return None
    if splice.is_server_send(send):
        return splice
    declared = scope.get("state", {}).get(SEND_PASSES_BODY)
    if declared is not None and declared[0] is send and splice.is_server_send(declared[1]):
        return splice
    return None

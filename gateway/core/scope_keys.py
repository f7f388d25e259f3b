"""The ``scope["state"]`` keys through which the proxy tells the metering middleware how
the upstream answered (the proxy writes them, the middleware reads them at settle time),
the one through which the middleware asks the proxy to drain a stream for its usage, the
one through which it offers to take a complete answer in one call, and the one through
which an app reports its own cost (DESIGN A8, middleware mode).

Defined once here, below both: ``gateway.proxy`` and ``gateway.metering`` never import
each other (docs/ARCHITECTURE.md, layers).
"""

from __future__ import annotations

__all__ = [
    "ANSWER_WHOLE",
    "APP_COST",
    "CLIENT_DISCONNECTED",
    "DRAINS_USAGE",
    "UPSTREAM_ERROR",
    "UPSTREAM_LATENCY_MS",
    "UPSTREAM_STATUS",
    "USAGE_DRAIN_SECONDS",
]

UPSTREAM_STATUS = "creditgate.upstream_status"
"""The upstream's HTTP status (int), once its response headers arrived."""

UPSTREAM_LATENCY_MS = "creditgate.upstream_latency_ms"
"""Milliseconds (float) from sending the request upstream to its response headers."""

UPSTREAM_ERROR = "creditgate.upstream_error"
"""Why the upstream failed (str): unreachable, timed out, or cut off mid-body. Its
presence makes the request a refund whatever status the client saw."""

CLIENT_DISCONNECTED = "creditgate.client_disconnected"
"""True when the client went away before the response was complete."""

USAGE_DRAIN_SECONDS = "creditgate.usage_drain_seconds"
"""Set by the middleware (float seconds, > 0) on a request whose charge is read from the
response's usage (DESIGN A8 ``usage``). When the client leaves before the response is
complete, the app keeps reading the upstream for at most this long and keeps handing each
chunk to ``send``, so that the usage at the stream's end is seen and charged; the
middleware forwards nothing once ``CLIENT_DISCONNECTED`` is set. ``UpstreamProxy`` does
this; see :data:`DRAINS_USAGE` for other apps."""

DRAINS_USAGE = "drains_usage"
"""The name of a class attribute an ASGI app sets to ``True`` when it honours
:data:`USAGE_DRAIN_SECONDS` itself (``UpstreamProxy``). For any other app the middleware
drains by holding the client's ``http.disconnect`` back from it for at most that long
(or until its response is complete), so that the app finishes its upstream call."""

ANSWER_WHOLE = "creditgate.answer_whole"
"""Set by the middleware's usage tap (DESIGN A8 ``usage``): ``(send, answer)``, where
``send`` is the ``send`` it hands the app and ``answer(start, body)`` an awaitable taking a
complete response at once: the ``http.response.start`` message and the whole body (bytes),
with the same outcome as sending the start and one final body message through ``send``.
An app that has a complete answer before it starts the response (the proxy: a body of
known length, read before the start) and whose ``send`` is that ``send`` may call it
instead: the tap then reads the usage, prices it, heads the start with the actual charge
and keeps the settle in one straight run, with no state kept between two messages."""

APP_COST = "creditgate_cost"
"""Middleware mode: the actual cost of the request (integer creditgate tokens >= 0) that
the app may set for a feature with a ``header`` cost, as an alternative to the response
header; read once the response is complete (capped by the feature's ``max``). A public
name, like ``creditgate_org``."""

"""The ``scope["state"]`` keys through which the proxy tells the metering middleware how
the upstream answered (the proxy writes them, the middleware reads them at settle time),
the one through which the middleware asks the proxy to drain a stream for its usage, the
one through which its usage tap offers to take a complete answer in one call and to leave
the request body (and the request's ``Accept-Encoding``) to the app, and the one through
which an app reports its own cost (DESIGN A8, middleware mode).

Defined once here, below both: ``gateway.proxy`` and ``gateway.metering`` never import
each other (docs/ARCHITECTURE.md, layers).
"""

from __future__ import annotations

__all__ = [
    "APP_COST",
    "ASKS_IDENTITY_ENCODING",
    "CLIENT_DISCONNECTED",
    "DRAINS_USAGE",
    "READS_USAGE_REQUEST",
    "UPSTREAM_ERROR",
    "UPSTREAM_LATENCY_MS",
    "UPSTREAM_STATUS",
    "USAGE_DRAIN_SECONDS",
    "USAGE_TAP",
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

USAGE_TAP = "creditgate.usage_tap"
"""Set by the middleware on a usage-cost request (DESIGN A8 ``usage``): ``(send, answer,
request)``, what its usage tap offers an app that knows this key (the proxy). ``send`` is
the ``send`` it hands the app.

``answer(start, body)``, a plain function, takes a complete response at once: the
``http.response.start`` message and the whole body (bytes). It returns the ``send`` to
which the caller then sends that start and one final body message (``{"type":
"http.response.body", "body": body, "more_body": False}``), or ``None``: send nothing. The
outcome is that of sending both messages through ``send``. An app that has a complete
answer before it starts the response (the proxy: a body of known length, read before the
start) and whose ``send`` is that ``send`` may call it instead: the tap then reads the
usage, prices it, heads the start with the actual charge and keeps the settle in one
straight run, with no state kept between two messages, and hands back the ``send`` behind
it, so that the app awaits the server's ``send`` as on a fixed-cost route.

``request`` is ``None``, or, for an app whose class sets :data:`READS_USAGE_REQUEST`, what
the middleware would otherwise have done to the request body before the call (ask an OpenAI
stream for its usage: ``stream_options.include_usage``), left to the app, which reads the
body anyway: ``(whole, read)``. The app gives its first ``http.request`` message to
``whole(first)`` when it holds the whole body (no ``more_body``) and forwards the message
returned; else it awaits ``read(scope, first, receive)`` and goes on with the ``(first,
receive)`` it returns (a message holding the whole body when it was read, else the body's
first message and a ``receive`` that replays the rest), or, for ``None`` (the client left),
forwards nothing. Either way the body it forwards may differ in length from the request's
Content-Length: the app frames it by its own length."""

READS_USAGE_REQUEST = "reads_usage_request"
"""The name of a class attribute an ASGI app sets to ``True`` when it honours the
``request`` element of :data:`USAGE_TAP` (``UpstreamProxy``): the middleware then leaves
the request body to it instead of reading it before the call and replaying it."""

ASKS_IDENTITY_ENCODING = "asks_identity_encoding"
"""The name of a class attribute an ASGI app sets to ``True`` when, on every request where
:data:`USAGE_TAP` is declared, it asks its upstream for an uncompressed answer itself
(``Accept-Encoding: identity`` in place of the client's: a usage cannot be read from a
compressed body), in the request head it builds (``UpstreamProxy``): the metering
middleware then leaves the request's headers as they are instead of copying them with that
header. Any other app gets the header in its scope's headers."""

APP_COST = "creditgate_cost"
"""Middleware mode: the actual cost of the request (integer creditgate tokens >= 0) that
the app may set for a feature with a ``header`` cost, as an alternative to the response
header; read once the response is complete (capped by the feature's ``max``). A public
name, like ``creditgate_org``."""

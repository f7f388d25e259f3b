"""The ``scope["state"]`` keys through which the proxy tells the metering middleware how
the upstream answered (the proxy writes them, the middleware reads them at settle time).

Defined once here, below both: ``gateway.proxy`` and ``gateway.metering`` never import
each other (docs/ARCHITECTURE.md, layers).
"""

from __future__ import annotations

__all__ = ["CLIENT_DISCONNECTED", "UPSTREAM_ERROR", "UPSTREAM_LATENCY_MS", "UPSTREAM_STATUS"]

UPSTREAM_STATUS = "creditgate.upstream_status"
"""The upstream's HTTP status (int), once its response headers arrived."""

UPSTREAM_LATENCY_MS = "creditgate.upstream_latency_ms"
"""Milliseconds (float) from sending the request upstream to its response headers."""

UPSTREAM_ERROR = "creditgate.upstream_error"
"""Why the upstream failed (str): unreachable, timed out, or cut off mid-body. Its
presence makes the request a refund whatever status the client saw."""

CLIENT_DISCONNECTED = "creditgate.client_disconnected"
"""True when the client went away before the response was complete."""

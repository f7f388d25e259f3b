"""creditgate: token budgets for AI features, enforced atomically in Redis.

``from gateway import CreditGate, CreditGateMiddleware`` gives the library API and the
ASGI middleware (contract A1). They are loaded on first use (PEP 562), so that importing a
low layer (``gateway.core.events`` from the sync worker, say) does not load the whole
gateway; docs/ARCHITECTURE.md has the map of the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.__about__ import __version__

if TYPE_CHECKING:
    from gateway.metering.gate import CreditGate
    from gateway.metering.middleware import CreditGateMiddleware

__all__ = ["CreditGate", "CreditGateMiddleware", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "CreditGate":
        from gateway.metering.gate import CreditGate

        return CreditGate
    if name == "CreditGateMiddleware":
        from gateway.metering.middleware import CreditGateMiddleware

        return CreditGateMiddleware
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")

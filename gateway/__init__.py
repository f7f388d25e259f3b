"""creditgate: token budgets for AI features, enforced atomically in Redis.

``from gateway import CreditGate, CreditGateMiddleware`` gives the library API and the
ASGI middleware (DESIGN A1).
"""

from gateway.__about__ import __version__
from gateway.gate import CreditGate
from gateway.middleware import CreditGateMiddleware

__all__ = ["CreditGate", "CreditGateMiddleware", "__version__"]

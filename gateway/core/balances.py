"""An org's balances as callers see them: value objects shared by the meter, the ledger's
usage report and the HTTP APIs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Balance", "BucketBalance"]


@dataclass(slots=True)
class BucketBalance:
    """One bucket's state as an org sees it now."""

    bucket: str
    allocated: int
    balance: int  # plan tokens left this period
    extra: int  # purchased tokens left
    used: int  # net tokens used this period
    in_plan: bool

    @property
    def available(self) -> int:
        """Tokens that can be spent now: plan tokens, then purchased ones."""
        return self.balance + self.extra


@dataclass(slots=True)
class Balance:
    """An org's plan, period and buckets (``GET /balance``)."""

    org: str
    plan: str
    period: str
    period_start_ms: int
    period_end_ms: int
    buckets: dict[str, BucketBalance] = field(default_factory=dict)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)

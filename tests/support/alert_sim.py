"""One org bucket's consistent stream events for the alert tests (the exact
gateway/core/events.py format, built by tests/sync/test_sync.py's ``event``)."""

from __future__ import annotations

import uuid
from typing import Any

from tests.sync.test_sync import NOV_15, event


class Bucket:
    """An org's bucket: reset, charge, refund-like credits and grants, each one event
    carrying the bucket's state after it (balance, extra, allocation, used, period)."""

    def __init__(self, org: str, bucket: str = "lead_generation", seq: int = 0) -> None:
        self.org, self.bucket, self.seq = org, bucket, seq
        self.bal = self.x = self.a = self.used = 0
        self.period = "2026-11"

    def _emit(self, kind: str, t: int, **extra: Any) -> dict[str, str]:
        self.seq += 1
        return event(
            self.org, kind, b=self.bucket, t=t, bal=self.bal, x=self.x, a=self.a,
            used=self.used, s=self.seq, per=self.period, ts=NOV_15 + self.seq, **extra,
        )  # fmt: skip

    def reset(self, alloc: int, period: str = "2026-11") -> dict[str, str]:
        before = self.bal
        self.bal, self.a, self.used, self.period = alloc, alloc, 0, period
        return self._emit("reset", before - alloc)

    def charge(self, cost: int) -> dict[str, str]:
        from_plan = min(self.bal, cost)
        self.bal -= from_plan
        self.x -= cost - from_plan
        assert self.x >= 0
        self.used += cost
        rid = uuid.uuid4().hex
        return self._emit("charge", cost, id=rid, rq=rid, f=self.bucket, st=200, lat=5)

    def refund(self, tokens: int) -> dict[str, str]:
        """Tokens back (as a repair would): used goes down, balance up."""
        self.bal += tokens
        self.used -= tokens
        return self._emit("repair", -tokens)

    def grant(self, amount: int) -> dict[str, str]:
        self.x += amount
        return self._emit("grant", -amount, id=f"grant:{self.org}:{uuid.uuid4().hex}")

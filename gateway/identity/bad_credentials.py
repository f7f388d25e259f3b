"""Throttling of clients that keep presenting bad credentials (key or token guessing).

One GCRA limiter per client address, in process: ``per_minute`` bad attempts are allowed
in a burst, then one every ``60 / per_minute`` seconds. The address the connection comes
from counts (``scope["client"]``); forwarding headers are ignored because a client can
write anything into them, except when that address is one of ``identity.trusted_proxies``
(gateway.identity.client_address). IPv6 clients are grouped by /64, the block one subscriber
typically gets, so an attacker cannot escape the limit by rotating through its own
addresses. The table of addresses is bounded: when full, the address updated longest ago
is forgotten (its limiter has most likely drained already).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from gateway.identity.client_address import TrustedProxies, peer_host

# Float slack so that exactly ``per_minute`` attempts in one instant are all allowed.
_EPSILON = 1e-6


def client_address(scope: Mapping[str, Any], proxies: TrustedProxies | None = None) -> str:
    """The limiter bucket of a request: its client address, IPv6 reduced to its /64.

    The TCP peer's address, or with ``proxies`` the client's address behind them.
    """
    host = peer_host(scope) if proxies is None else proxies.client_host(scope)
    if host is None:
        # Unix socket or a server that does not report the peer: one shared bucket.
        return "-"
    if ":" not in host:
        return host
    try:
        addr = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = addr.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


class BadCredentialLimiter:
    """Counts bad credential attempts per client address and says when to refuse."""

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = 100_000,
    ) -> None:
        # per_minute <= 0 disables the limiter.
        self.per_minute = per_minute
        self._interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self._clock = clock
        self._max = max_addresses
        # address -> theoretical arrival time of the next allowed bad attempt (GCRA).
        self._tat: OrderedDict[str, float] = OrderedDict()

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None when it is not blocked."""
        tat = self._tat.get(address)
        if tat is None:
            return None
        now = self._clock()
        wait = tat + self._interval - 60.0 - now
        if wait <= _EPSILON:
            if tat <= now:
                del self._tat[address]  # fully drained: same as never seen
            return None
        return max(1, math.ceil(wait))

    def record(self, address: str) -> None:
        """Count one bad attempt from ``address``."""
        if self.per_minute <= 0:
            return
        now = self._clock()
        tat = self._tat.pop(address, None)
        if tat is None and len(self._tat) >= self._max:
            self._tat.popitem(last=False)
        self._tat[address] = (now if tat is None else max(tat, now)) + self._interval

    def __len__(self) -> int:
        return len(self._tat)

"""A bounded in-process cache whose entries expire at a given time.

Used on the request hot path (resolved API keys, verified JWTs), so a hit is one dict
lookup and one comparison; the caller passes the current time so that a single clock read
serves several checks. When full, the oldest inserted entry is evicted: every entry of one
cache has about the same lifetime, so the oldest is also the one closest to expiring.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most ``max_entries`` values, each valid until its own ``expires_at``."""

    __slots__ = ("_data", "max_entries")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # OrderedDict: popitem(last=False) is O(1); a plain dict's "first key" is not once
        # many entries have been deleted from its front.
        self._data: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def get(self, key: K, now: float) -> V | None:
        """The value of ``key`` if present and not expired at ``now``."""
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._data[key]
            return None
        return entry[0]

    def put(self, key: K, value: V, expires_at: float) -> None:
        """Store ``value`` until ``expires_at``, evicting the oldest entry when full."""
        data = self._data
        if key in data:
            del data[key]  # re-inserted below, as the newest
        elif len(data) >= self.max_entries:
            data.popitem(last=False)
        data[key] = (value, expires_at)

    def discard(self, key: K) -> None:
        """Forget ``key`` if present."""
        self._data.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

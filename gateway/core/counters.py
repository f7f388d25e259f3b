"""Hot-path counters: plain integers the request path bumps, read at scrape time.

The hot path only bumps plain integers in a :class:`HotMetrics`: each gate's
``gate.counters``, by default the process's :data:`METRICS`. The Prometheus collector in
:mod:`gateway.http.metrics` turns a gate's counters into metrics when its ``/metrics`` is
scraped. Measured on this project's machine (CPython 3.11, best of 5):
``METRICS.count(feature, outcome, tokens)`` ~95 ns and ``METRICS.observe_admit(s)`` ~100 ns,
against ~560 ns for the same two counters as pre-bound ``prometheus_client`` children and
~525 ns for its histogram ``observe()`` (each takes a lock). Everything runs on the server's
event loop, so the counters need no lock.
"""

from __future__ import annotations

from bisect import bisect_right

__all__ = ["ADMIT_BUCKETS", "MAX_MODELS", "METRICS", "NO_MODEL", "OTHER_MODEL", "HotMetrics"]

# Upper bounds (seconds) of the admission latency histogram: a local Redis answers in
# ~0.1-1 ms; the top buckets catch timeouts (redis_timeout_seconds defaults to 2).
ADMIT_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


# Model names come from upstream responses: at most this many (feature, model) series are
# kept; later new ones are counted under OTHER_MODEL. A settle that named no model counts
# under NO_MODEL.
MAX_MODELS = 500
OTHER_MODEL = "other"
NO_MODEL = "unknown"


class _Cell:
    __slots__ = ("n", "tokens")

    def __init__(self) -> None:
        self.n = 0
        self.tokens = 0


class HotMetrics:
    """Counters the request path bumps; read by the collector at scrape time."""

    __slots__ = ("_admit", "_admit_count", "_admit_sum", "_cells", "_missing", "_models")

    def __init__(self) -> None:
        self._cells: dict[tuple[str, str], _Cell] = {}
        self._models: dict[tuple[str, str], int] = {}
        self._missing: dict[str, int] = {}
        self._admit = [0] * (len(ADMIT_BUCKETS) + 1)
        self._admit_sum = 0.0
        self._admit_count = 0

    def count(self, feature: str, outcome: str, tokens: int = 0) -> None:
        """One metered request of ``feature`` ended with ``outcome`` (``tokens`` charged)."""
        cell = self._cells.get((feature, outcome))
        if cell is None:
            cell = self._cells[(feature, outcome)] = _Cell()
        cell.n += 1
        cell.tokens += tokens

    def charged_usage(self, feature: str, model: str, tokens: int, missing: bool) -> None:
        """``count(feature, "charged", tokens)`` and ``usage(feature, model, tokens,
        missing)`` in one call: a usage-charged answer's settle (the middleware's)."""
        cell = self._cells.get((feature, "charged"))
        if cell is None:
            cell = self._cells[(feature, "charged")] = _Cell()
        cell.n += 1
        cell.tokens += tokens
        # usage(), inlined: every usage-charged answer through the proxy comes here.
        key = (feature, model or NO_MODEL)
        models = self._models
        n = models.get(key)
        if n is None and len(models) >= MAX_MODELS:
            key = (feature, OTHER_MODEL)
            n = models.get(key)
        models[key] = (n or 0) + tokens
        if missing:
            self._missing[feature] = self._missing.get(feature, 0) + 1

    def usage(self, feature: str, model: str, tokens: int, missing: bool = False) -> None:
        """One request of ``feature`` whose cost came from the call was settled: ``tokens``
        is its actual charge (creditgate tokens, overage included), ``model`` the model the
        upstream named ("" when none), ``missing`` whether the usage never came and the
        feature's ``on_missing_usage`` policy decided the charge. Feeds
        ``creditgate_tokens_by_model_total{feature,model}`` and
        ``creditgate_usage_missing_total{feature}``."""
        key = (feature, model or NO_MODEL)
        models = self._models
        n = models.get(key)
        if n is None and len(models) >= MAX_MODELS:
            key = (feature, OTHER_MODEL)
            n = models.get(key)
        models[key] = (n or 0) + tokens
        if missing:
            self._missing[feature] = self._missing.get(feature, 0) + 1

    def observe_admit(self, seconds: float) -> None:
        """One admission round trip to Redis took ``seconds``."""
        self._admit[bisect_right(ADMIT_BUCKETS, seconds)] += 1
        self._admit_sum += seconds
        self._admit_count += 1

    def requests(self) -> dict[tuple[str, str], tuple[int, int]]:
        """``{(feature, outcome): (requests, tokens)}`` so far."""
        return {k: (c.n, c.tokens) for k, c in self._cells.items()}

    def tokens_by_model(self) -> dict[tuple[str, str], int]:
        """``{(feature, model): tokens}`` of the settles reported to :meth:`usage`."""
        return dict(self._models)

    def usage_missing(self) -> dict[str, int]:
        """``{feature: settles whose usage was missing}``."""
        return dict(self._missing)

    def admit_histogram(self) -> tuple[list[int], float, int]:
        """(per-bucket counts, the last one above every bound), sum, count."""
        return list(self._admit), self._admit_sum, self._admit_count

    def reset(self) -> None:
        """Forget everything (tests)."""
        self._cells.clear()
        self._models.clear()
        self._missing.clear()
        self._admit = [0] * (len(ADMIT_BUCKETS) + 1)
        self._admit_sum = 0.0
        self._admit_count = 0


METRICS = HotMetrics()
"""The process's counters: every gate's ``counters`` unless it was given its own."""

"""The router: which feature (if any) a request meters, on a normalised path.

A :class:`Router` is compiled once from the config: parameterless templates are a dict
lookup whose answer already accounts for earlier templated routes (first match wins), and
the templated routes of each method are one combined regular expression. Paths are
normalised by :mod:`gateway.routing.paths` before matching (the same form is forwarded).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.routing.paths import (
    AmbiguousPath,
    encode_path,
    normalize_path,
    strip_path_params,
)
from gateway.routing.templates import HTTP_METHODS, RouteSpec, Template, parse_template


class MeteredRouteSpec(RouteSpec, Protocol):
    """A route table entry as the router reads it (``gateway.config.RouteConfig``)."""

    @property
    def feature(self) -> str: ...

    @property
    def cost(self) -> int | None: ...


class RouterSource(Protocol):
    """The part of the configuration a router is compiled from (``gateway.config.Config``).

    A protocol rather than the config class, so that routing sits below the configuration
    layer: the config's checks use :mod:`gateway.routing.templates` to validate routes.
    """

    @property
    def routes(self) -> Sequence[MeteredRouteSpec]: ...

    @property
    def routes_ignore_case(self) -> bool: ...

    @property
    def forward_trailing_slash(self) -> bool: ...

    def bucket_of(self, feature: str) -> str:
        """The bucket ``feature`` draws from."""
        ...

    def cost_of(self, feature: str) -> int:
        """The configured cost of one call of ``feature``."""
        ...


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The metered route a request matched (shared, immutable: one per route)."""

    feature: str
    bucket: str
    cost: int
    template: str
    method: str


_Combined = tuple[re.Pattern[str] | None, tuple["RouteMatch | None", ...]]
# What Router.resolve answers: the route (or None), the normalised path, its encoding.
Resolved = tuple["RouteMatch | None", str, bytes]
# Router.resolve remembers this many raw paths per method (then starts again), each at
# most this long: enough for every literal route and the busy templated ones, bounded
# however many distinct paths clients send.
_RESOLVED_CACHE_SIZE = 4096
_RESOLVED_MAX_PATH = 512


@dataclass(frozen=True, slots=True)
class _MethodTable:
    exact: dict[str, RouteMatch]
    # Templated routes, one combined regex per number of '/' in the path: parameters other
    # than {name:path} never match a '/', so a path can only match templates with as many.
    # Index k holds the routes a path with k slashes can match; longer paths use `deeper`.
    by_slashes: tuple[_Combined, ...]
    deeper: _Combined


def _combine(routes: list[tuple[Template, RouteMatch]]) -> _Combined:
    """One alternation of the routes' regexes, in order; group number -> route."""
    if not routes:
        return None, ()
    pattern = re.compile("|".join(f"({t.regex})" for t, _ in routes))
    return pattern, (None, *(m for _, m in routes))


class Router:
    """Matches ``(method, normalised path)`` to a metered route; first route in order wins.

    ``case_insensitive`` (default: the config's ``routes_ignore_case``) matches paths
    ignoring case, for upstreams that route that way (e.g. Express by default).
    """

    def __init__(self, config: RouterSource, case_insensitive: bool | None = None) -> None:
        if case_insensitive is None:
            case_insensitive = config.routes_ignore_case
        self.case_insensitive = case_insensitive
        self.forward_trailing_slash = config.forward_trailing_slash
        per_method: dict[str, list[tuple[Template, RouteMatch]]] = {}
        ordered: list[RouteMatch] = []
        for route in config.routes:
            method = route.method.upper()
            # Case-insensitive matching compares lower-cased paths with lower-cased
            # templates, so both sides fold the same way (str.lower, not re.IGNORECASE).
            template = parse_template(self._fold(route.path))
            match = RouteMatch(
                feature=route.feature,
                bucket=config.bucket_of(route.feature),
                cost=route.cost if route.cost is not None else config.cost_of(route.feature),
                template=route.path,
                method=method,
            )
            per_method.setdefault(method, []).append((template, match))
            ordered.append(match)
        self._tables = {m: self._compile(rs) for m, rs in per_method.items()}
        self._resolved: dict[str, dict[bytes, Resolved]] = {}
        #: Every route, in config order.
        self.routes: tuple[RouteMatch, ...] = tuple(ordered)

    def _fold(self, text: str) -> str:
        return text.lower() if self.case_insensitive else text

    def _compile(self, routes: list[tuple[Template, RouteMatch]]) -> _MethodTable:
        templated = [(t, m) for t, m in routes if t.literal is None]
        top = max((t.slashes for t, _ in templated), default=0)

        def candidates(k: int) -> list[tuple[Template, RouteMatch]]:
            return [
                (t, m) for t, m in templated if t.slashes == k or (t.open_ended and t.slashes <= k)
            ]

        by_slashes = tuple(_combine(candidates(k)) for k in range(top + 1))
        deeper = _combine([(t, m) for t, m in templated if t.open_ended])
        # The answer for each exact path is settled now, in config order: an earlier
        # templated route that also matches the literal wins over the exact route.
        exact: dict[str, RouteMatch] = {}
        for index, (template, match) in enumerate(routes):
            if template.literal is None:
                continue
            key = template.literal
            if key in exact:
                continue
            winner = match
            for earlier, earlier_match in routes[:index]:
                if earlier.literal is None and re.fullmatch(earlier.regex, key):
                    winner = earlier_match
                    break
            exact[key] = winner
        return _MethodTable(exact, by_slashes, deeper)

    def resolve(self, method: str, raw_path: bytes) -> Resolved:
        """``(match(method, p), p, encode_path(p))`` for ``p = normalize_path(raw_path)``
        (with the request's trailing slash put back on ``p`` when the config's
        ``forward_trailing_slash`` is on: the path to forward).

        Raises :class:`BadPath` as ``normalize_path`` does. A pure function of its
        arguments, so answers are cached (per method, bounded): a request on a known path
        costs two dict lookups instead of a regex scan, a match and an encoding.
        """
        cache = self._resolved.get(method)
        if cache is None:
            if method not in HTTP_METHODS:  # any token is a method to some servers: no cache
                return self._resolve(method, raw_path)
            cache = self._resolved.setdefault(method, {})
        hit = cache.get(raw_path)
        if hit is not None:
            return hit
        resolved = self._resolve(method, raw_path)
        if len(raw_path) <= _RESOLVED_MAX_PATH:
            if len(cache) >= _RESOLVED_CACHE_SIZE:
                cache.clear()
            # bytes(): a bytes subclass must not stand in for the key later.
            cache[bytes(raw_path)] = resolved
        return resolved

    def _resolve(self, method: str, raw_path: bytes) -> Resolved:
        path = normalize_path(raw_path)
        match = self.match(method, path)
        if match is None and ";" in path and self.match(method, strip_path_params(path)):
            raise AmbiguousPath("';' path parameters on a metered route")
        if self.forward_trailing_slash and path != "/" and raw_path.endswith(b"/"):
            path += "/"  # matched without it: "/x/" and "/x" are the same route, both charged
        return (match, path, encode_path(path))

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The route for ``method`` and a path from :func:`normalize_path`, or None.

        HEAD is matched as GET: frameworks run the GET handler for HEAD requests.
        """
        method = method.upper()
        if method == "HEAD":
            method = "GET"
        table = self._tables.get(method)
        if table is None:
            return None
        if self.case_insensitive:
            path = path.lower()
        hit = table.exact.get(path)
        if hit is not None:
            return hit
        slashes = path.count("/")
        pattern, by_group = (
            table.by_slashes[slashes] if slashes < len(table.by_slashes) else table.deeper
        )
        if pattern is None:
            return None
        found = pattern.fullmatch(path)
        if found is None:
            return None
        return by_group[found.lastindex or 0]

"""Route matching: which feature (if any) a request meters, on a normalised path.

Security rests on one rule: the path that is matched is the path that is forwarded. The
raw request path is decoded exactly once and normalised (:func:`normalize_path`), matched,
and the same normalised path is re-encoded canonically (:func:`encode_path`) for the
upstream. So ``/api/%76%31/leads//generate/`` and ``/api/v1/x/../leads/generate`` meter
and reach the same handler as ``/api/v1/leads/generate``. Spellings whose meaning differs
between servers (an encoded ``/`` or ``\\``, NUL and control characters, invalid escapes or
UTF-8) are refused outright with :class:`BadPath` instead of guessed at.

Templates use Starlette's syntax (``/goals/{goal_id}``, ``{n:int}``, ``{rest:path}``) and
convertor patterns. A :class:`Router` is compiled once: parameterless templates are a dict
lookup whose answer already accounts for earlier templated routes (first match wins), and
the templated routes of each method are one combined regular expression.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote_to_bytes

from starlette.convertors import CONVERTOR_TYPES

if TYPE_CHECKING:
    from gateway.config import Config, RouteConfig


class BadPath(ValueError):
    """A request path that creditgate refuses to interpret (answered with 400)."""


class AmbiguousPath(BadPath):
    """A path that matches no route as written but a metered one once its ``;`` path
    parameters are dropped, as Java servlet containers (Tomcat, Jetty, Spring) do before
    routing: forwarding it would let such an upstream serve a metered route uncharged
    (``/api/v1/leads/generate;x``, ``/public/..;/api/v1/leads/generate``). Always refused."""


# What sends a path down the slow path: escapes, backslashes, dot segments (and anything
# else starting with "/."), empty segments, a trailing slash, and every byte outside
# printable ASCII. Most real paths have none of these and are returned as they are.
_NEEDS_WORK = re.compile(rb"[^\x21-\x7e]|%|\\|//|/\.|./$")
_ESCAPE = re.compile(rb"%(..)?", re.DOTALL)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# Decoded characters that are refused: '/' and '\\' would change the segment structure
# between servers; controls (C0, DEL, C1) have no business in a path.
_FORBIDDEN_ESCAPED = frozenset([*range(0x20), 0x7F, 0x2F, 0x5C])
_C1 = re.compile("[\x80-\x9f]")


def normalize_path(raw: bytes | str) -> str:
    """Decode and normalise a raw request path (no query string); raise :class:`BadPath`.

    Percent-decodes once, removes dot segments (``..`` never climbs above the root),
    collapses repeated slashes and drops a trailing slash. A ``str`` is taken to be the
    raw (still encoded) form. The result contains decoded characters (``%25`` becomes ``%``),
    so feed it to :func:`encode_path`, not back to this function.
    """
    if isinstance(raw, str):
        try:
            data = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise BadPath("path is not valid Unicode") from None
    else:
        data = raw
    if not data.startswith(b"/"):
        raise BadPath("path must start with '/'")
    if _NEEDS_WORK.search(data) is None:
        return data.decode("ascii")
    if b"\\" in data:
        raise BadPath("backslash in path")
    if _CONTROL.search(data) is not None:
        raise BadPath("control character in path")
    if b"%" in data:
        for match in _ESCAPE.finditer(data):
            pair = match.group(1)
            if pair is None or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadPath("invalid percent escape in path")
            if int(pair, 16) in _FORBIDDEN_ESCAPED:
                raise BadPath(f"forbidden percent escape %{pair.decode('ascii')} in path")
        data = unquote_to_bytes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("path is not valid UTF-8") from None
    if not text.isascii() and _C1.search(text) is not None:
        raise BadPath("control character in path")
    return _join_segments(text.split("/"))


def _join_segments(segments: Iterable[str]) -> str:
    """Join decoded segments into a path: empty and ``.`` segments dropped, ``..`` removing
    the one before it (never climbing above the root), no trailing slash."""
    out: list[str] = []
    for segment in segments:
        if segment == "" or segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


def strip_path_params(path: str) -> str:
    """A normalised path as a servlet container routes it: each segment cut at its first
    ``;`` (``/a;x=1/b`` -> ``/a/b``; ``/a/..;/b`` -> ``/b``)."""
    return _join_segments(segment.split(";", 1)[0] for segment in path.split("/"))


# RFC 3986 pchar minus '%' (unreserved and alphanumerics are always kept by quote()).
_SAFE = "/:@!$&'()*+,;="
_PLAIN = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=\-._~]*")


def encode_path(path: str) -> bytes:
    """The canonical percent-encoding of a normalised path, to forward upstream."""
    if _PLAIN.fullmatch(path) is not None:
        return path.encode("ascii")
    return quote(path, safe=_SAFE, encoding="utf-8", errors="strict").encode("ascii")


# ---------------------------------------------------------------------------------------
# Templates

_PARAM = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KNOWN_CONVERTORS = ("str", "int", "float", "uuid", "path")


def _convertor_regex(kind: str) -> str:
    # Starlette's patterns, with groups made non-capturing: the combined regex identifies
    # the matched route by its group number.
    return re.sub(r"\((?!\?)", "(?:", CONVERTOR_TYPES[kind].regex)


_CONVERTOR_RE = {kind: _convertor_regex(kind) for kind in KNOWN_CONVERTORS}


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed path template."""

    text: str
    regex: str  # anchored by the caller; no capturing groups
    literal: str | None  # the exact path when the template has no parameters
    shape: str  # the template with parameter names erased (for duplicate detection)
    slashes: int  # the number of '/' a matching path has (at least, when open-ended)
    open_ended: bool  # ends with a {name:path} parameter, which may match more '/'


def parse_template(template: str) -> Template:
    """Parse a Starlette-syntax path template; raise ``ValueError`` saying what is wrong."""
    if not template.startswith("/"):
        raise ValueError("must start with '/'")
    regex: list[str] = []
    shape: list[str] = []
    seen: set[str] = set()
    pos = 0
    params = list(_PARAM.finditer(template))
    for index, match in enumerate(params):
        regex.append(re.escape(template[pos : match.start()]))
        shape.append(template[pos : match.start()])
        name, _, kind = match.group(1).partition(":")
        kind = kind or "str"
        if _NAME.fullmatch(name) is None:
            raise ValueError(f"invalid parameter name {name!r}")
        if name in seen:
            raise ValueError(f"duplicate parameter {name!r}")
        seen.add(name)
        if kind not in _CONVERTOR_RE:
            raise ValueError(
                f"unknown convertor {kind!r} in {{{match.group(1)}}}"
                f" (known: {', '.join(KNOWN_CONVERTORS)})"
            )
        if kind == "path" and (index != len(params) - 1 or match.end() != len(template)):
            raise ValueError(f"a path parameter ({{{match.group(1)}}}) must come last")
        regex.append(_CONVERTOR_RE[kind])
        shape.append("{:" + kind + "}")
        pos = match.end()
    regex.append(re.escape(template[pos:]))
    shape.append(template[pos:])
    literals = _PARAM.sub("x", template)
    if "{" in literals or "}" in literals:
        raise ValueError("unbalanced braces")
    if "%" in literals:
        raise ValueError("percent-escapes are not allowed: write the decoded character")
    try:
        normal = normalize_path(literals)
    except BadPath as exc:
        raise ValueError(str(exc)) from None
    if normal != literals:
        raise ValueError(
            "not a normalised path (no '.', '..', empty segments or trailing slash):"
            " it would never match"
        )
    return Template(
        template,
        "".join(regex),
        None if params else template,
        "".join(shape),
        literals.count("/"),
        bool(params) and params[-1].group(1).endswith(":path"),
    )


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


def route_table_errors(routes: Sequence[RouteConfig], ignore_case: bool = False) -> list[str]:
    """Errors (``routes[i].key: message``) in methods, templates and order of a route table.

    Besides bad methods and templates: a route with the same method and template as an
    earlier one (parameter names aside), and an exact route that an earlier templated route
    of the same method always wins over (first match wins, so it could never match).
    """
    errors: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    templated: list[tuple[int, str, Template]] = []
    for i, route in enumerate(routes):
        method = route.method.upper()
        if method == "HEAD":
            errors.append(f"routes[{i}].method: HEAD requests match GET routes: declare GET")
        elif method not in HTTP_METHODS:
            errors.append(f"routes[{i}].method: unknown HTTP method {route.method!r}")
        try:
            template = parse_template(route.path.lower() if ignore_case else route.path)
        except ValueError as exc:
            errors.append(f"routes[{i}].path: bad path template {route.path!r}: {exc}")
            continue
        first = seen.setdefault((method, template.shape), i)
        if first != i:
            errors.append(
                f"routes[{i}]: duplicate route: same as routes[{first}]"
                f" ({method} {routes[first].path})"
            )
        elif template.literal is None:
            templated.append((i, method, template))
        else:
            for j, other_method, earlier in templated:
                if other_method == method and re.fullmatch(earlier.regex, template.literal):
                    errors.append(
                        f"routes[{i}]: never matches: routes[{j}]"
                        f" ({method} {routes[j].path}) matches it first"
                    )
                    break
    return errors


# ---------------------------------------------------------------------------------------
# Router


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

    def __init__(self, config: Config, case_insensitive: bool | None = None) -> None:
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
                cost=route.cost if route.cost is not None else config.features[route.feature].cost,
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

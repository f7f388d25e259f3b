"""Route templates (Starlette's syntax) and the checks of a whole route table.

Templates use Starlette's syntax (``/goals/{goal_id}``, ``{n:int}``, ``{rest:path}``) and
convertor patterns; :func:`route_table_errors` is what ``check-config`` reports about them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from starlette.convertors import CONVERTOR_TYPES

from gateway.routing.paths import BadPath, normalize_path

__all__ = [
    "HTTP_METHODS",
    "KNOWN_CONVERTORS",
    "RouteSpec",
    "Template",
    "parse_template",
    "route_table_errors",
]


class RouteSpec(Protocol):
    """What a route table entry must say (``gateway.config.RouteConfig`` has it)."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...


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


def route_table_errors(routes: Sequence[RouteSpec], ignore_case: bool = False) -> list[str]:
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

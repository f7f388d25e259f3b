"""Step 2 of loading a config: the structure, validated by pydantic with unknown keys
rejected, every error in the config's words; and the part of the file that is still sound,
so that the meaning checks (step 3, :mod:`.checks`) run on it in the same pass.

Pydantic reports every structure error at once, but then gives no model, and the meaning
checks need one: a float cost in one feature used to hide a negative cost in another, and a
typo hid an unset ``admin_token``. So each error's smallest self-contained part is set
aside (*pruned*) and the rest validated again:

- an unknown key: the key alone (the rest of its section is sound);
- any other error: the entry of the nearest mapping or list it is in (``features.a``,
  ``routes[3]``, ``plans.pro.rate_limits[0]``), else its top-level key (``identity``).

The meaning errors of the pruned config are then reported too, except:

- errors at or under a pruned key path (the structure error there is the news, and the
  default that replaced the value means nothing);
- references to names that pruned entries define (a feature, its bucket, a plan), which are
  neither known nor unknown: :attr:`Structure.unchecked`; a misspelt section (``featurs``,
  absent ``features``) makes every name of that kind unchecked;
- list positions are renumbered to the file's: with ``routes[1]`` set aside, the third
  route is still reported as ``routes[2]``.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from types import UnionType
from typing import Annotated, Any, Union, cast, get_args, get_origin

from pydantic import BaseModel, ValidationError

from gateway.config.schema import Config
from gateway.config.source import fmt_loc, show_value

__all__ = ["Structure", "describe", "validate_structure"]

Loc = tuple[Any, ...]


class _Everything:
    """A container of every name: all names of a kind are unchecked."""

    def __contains__(self, item: object) -> bool:
        return True


EVERYTHING: Container[str] = _Everything()


def _unwrap(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (Union, UnionType) and len(args) == 1:
        return args[0]
    if get_origin(tp) is Annotated:
        return args[0]
    return tp


def _known_keys(loc: Sequence[Any]) -> list[str]:
    """The keys the schema allows at ``loc`` (for "did you mean" hints)."""
    tp: Any = Config
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            tp = field.annotation
        elif get_origin(tp) in (dict, list):
            tp = get_args(tp)[-1]
        else:
            return []
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _meant(loc: Loc) -> str | None:
    """The known key an unknown key at ``loc`` is probably a misspelling of."""
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1)
    return close[0] if close else None


_TYPE_WORDS = {
    "int": "an integer",
    "bool": "true or false",
    "float": "a number",
    "string": "a string",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
    "list": "a list",
}


def describe(error: Any) -> str:
    """One pydantic error in the config's words: ``plans.pro.alocations: unknown key``."""
    loc, kind, given = tuple(error["loc"]), error["type"], error.get("input")
    if loc and loc[-1] == "[key]":
        return f"{fmt_loc((*loc[:-2], str(loc[-2])))}: keys must be strings (quote it)"
    path = fmt_loc(loc)
    if kind == "extra_forbidden":
        meant = _meant(loc)
        return f"{path}: unknown key" + (f" (did you mean {meant!r}?)" if meant else "")
    if kind == "missing":
        return f"{path}: required key missing"
    if kind == "literal_error":
        return f"{path}: must be {error['ctx']['expected']}, got {show_value(given)}"
    base = kind.split("_")[0] if kind.endswith(("_type", "_parsing")) else kind
    base = "model_attributes" if kind == "model_attributes_type" else base
    if base in _TYPE_WORDS:
        hint = " (quote it)" if base == "string" and isinstance(given, int | float) else ""
        return f"{path}: expected {_TYPE_WORDS[base]}, got {show_value(given)}{hint}"
    if kind == "int_from_float":
        return f"{path}: expected an integer, got {show_value(given)}"
    if kind == "value_error":
        return f"{path}: {error['msg'].removeprefix('Value error, ')}"
    return f"{path}: {error['msg']} (got {show_value(given)})"


def _prune_point(loc: Loc) -> Loc:
    """The part set aside for an error (not an unknown key) at ``loc``: the entry of the
    nearest mapping or list the error is in, else the top-level key; () when the error is
    about the whole document."""
    if loc and loc[-1] == "[key]":  # a key that is not a string: its entry
        loc = loc[:-1]
    point, tp = loc[:1], cast(Any, Config)
    for depth, part in enumerate(loc):
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field_info = tp.model_fields.get(part) if isinstance(part, str) else None
            if field_info is None:
                break
            tp = field_info.annotation
        elif get_origin(tp) in (dict, list):
            point, tp = loc[: depth + 1], get_args(tp)[-1]
        else:
            break
    return point


def _lookup(tree: Any, loc: Loc) -> Any:
    """The value at ``loc`` in the parsed tree, or None when there is none."""
    node = tree
    for part in loc:
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not in_list and not (isinstance(node, dict) and part in node):
            return None
        node = node[part]
    return node


@dataclass
class Structure:
    """The outcome of step 2: structure errors, and the config that is still checkable."""

    errors: list[str]
    """Every structure error, ``key.path: message``, in pydantic's order (the file's)."""
    config: Config | None
    """The config without the pruned parts; None when even that is not valid."""
    pruned: list[Loc] = field(default_factory=list)
    """Key paths (positions as in the file) whose meaning errors are not reported."""
    kept: dict[str, list[int]] = field(default_factory=dict)
    """For each list with entries set aside: the file positions of the entries kept."""
    unchecked: dict[str, Container[str]] = field(default_factory=dict)
    """``feature``, ``bucket``, ``plan``: names defined by pruned entries."""

    def meaning_errors(self, errors: Iterable[str]) -> list[str]:
        """The meaning checks' errors as the file numbers them, without those under a
        pruned path."""
        pruned = [fmt_loc(loc) for loc in self.pruned]
        renumber = self._renumberer()
        out = []
        for error in errors:
            error = renumber(error)
            if not any(_under(error, path) for path in pruned):
                out.append(error)
        return out

    def _renumberer(self) -> Any:
        if not self.kept:
            return lambda error: error
        names = sorted(self.kept, key=len, reverse=True)
        pattern = re.compile(r"(?<![\w.\]\"])(" + "|".join(map(re.escape, names)) + r")\[(\d+)\]")

        def one(match: re.Match[str]) -> str:
            positions, index = self.kept[match.group(1)], int(match.group(2))
            return f"{match.group(1)}[{positions[index] if index < len(positions) else index}]"

        return lambda error: pattern.sub(one, error)


def _under(error: str, path: str) -> bool:
    """Whether ``error`` (``key.path: message``) is about ``path`` or something inside it."""
    return error.startswith(path) and error[len(path) : len(path) + 1] in (":", ".", "[")


def validate_structure(tree: dict[str, Any]) -> Structure:
    """Validate ``tree`` (the expanded YAML); on errors, also the config without the parts
    they are in (see the module docstring)."""
    try:
        return Structure([], Config.model_validate(tree))
    except ValidationError as exc:
        details = exc.errors()
    errors = [describe(e) for e in details]
    points: set[Loc] = set()
    suppressed: list[Loc] = []
    for error in details:
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden" and loc:
            points.add(loc)
            meant = _meant(loc)
            parent = _lookup(tree, loc[:-1])
            if meant is not None and isinstance(parent, dict) and meant not in parent:
                # Probably the misspelt key: what it would have said is unknown.
                suppressed.append((*loc[:-1], meant))
        else:
            point = _prune_point(loc)
            if not point:
                return Structure(errors, None)  # an error about the whole document
            points.add(point)
    pruned_tree = copy.deepcopy(tree)
    pruned, kept = _prune(pruned_tree, points)
    try:
        config = Config.model_validate(pruned_tree)
    except ValidationError:  # cannot happen for the schema's shapes; stay safe
        return Structure(errors, None)
    pruned += suppressed
    return Structure(errors, config, pruned, kept, _unchecked(tree, pruned))


def _prune(tree: dict[str, Any], points: set[Loc]) -> tuple[list[Loc], dict[str, list[int]]]:
    """Remove ``points`` from ``tree`` (keys at once; list entries after every lookup, so
    positions stay the file's); return what was removed and, per list, what was kept."""
    done: list[Loc] = []
    from_lists: dict[int, tuple[Loc, list[Any], set[int]]] = {}
    for point in sorted(points, key=len):
        if any(point[:i] in done for i in range(1, len(point))):
            continue  # inside a part already set aside
        parent, key = _lookup(tree, point[:-1]), point[-1]
        if isinstance(parent, dict) and key in parent:
            del parent[key]
        elif isinstance(parent, list) and isinstance(key, int) and 0 <= key < len(parent):
            from_lists.setdefault(id(parent), (point[:-1], parent, set()))[2].add(key)
        else:
            continue
        done.append(point)
    kept: dict[str, list[int]] = {}
    for loc, entries, removed in from_lists.values():
        kept[fmt_loc(loc)] = [i for i in range(len(entries)) if i not in removed]
        entries[:] = [entry for i, entry in enumerate(entries) if i not in removed]
    return done, kept


def _unchecked(tree: dict[str, Any], pruned: list[Loc]) -> dict[str, Container[str]]:
    features: set[str] = set()
    buckets: set[str] = set()
    plans: set[str] = set()
    for loc in pruned:
        if len(loc) == 2 and loc[0] == "features":
            features.add(str(loc[1]))
            buckets.add(str(loc[1]))
            bucket = _lookup(tree, (*loc, "bucket"))
            if isinstance(bucket, str):
                buckets.add(bucket)
        elif len(loc) == 2 and loc[0] == "plans":
            plans.add(str(loc[1]))
    every_feature = ("features",) in pruned
    return {
        "feature": EVERYTHING if every_feature else features,
        "bucket": EVERYTHING if every_feature else buckets,
        "plan": EVERYTHING if ("plans",) in pruned else plans,
    }

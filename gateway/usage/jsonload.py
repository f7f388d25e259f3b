"""The one JSON decode of the usage readers: orjson when it is installed, else the standard
library, with the same answers either way.

A usage-charged JSON answer is decoded whole on every request, and the standard library's
decoder is most of what reading its usage costs (~4 µs for a 900-byte chat completion, ~25
µs for a 30 KB one; bench/usage_tap.py). orjson decodes the same bodies 2-4x faster. It is
a dependency (pyproject.toml) but optional here: without it everything works, a little
slower.

Where the two decoders disagree, the standard library's answer is the one kept, so that a
reader gives the same result whichever is installed (tests/usage/test_jsonload.py compares
them on hostile bodies):

- orjson refuses what ``json.loads`` accepts: ``NaN``/``Infinity``, numbers beyond a
  float's range, lone surrogates (escaped, or encoded in the bytes), a UTF-8 byte order mark,
  UTF-16 and UTF-32 bodies. Any refusal by orjson is therefore decoded again by the standard
  library, whose verdict stands.
- orjson nests up to 1024 levels, the standard library only as deep as the interpreter's
  recursion limit allows (less than 1000, and less the deeper the caller's stack). A
  document orjson finds nested more than :data:`_ORJSON_MAX_DEPTH` levels deep is decoded
  again by the standard library.
- orjson turns an integer outside 64 bits into a float, the standard library keeps it an
  ``int``. Neither is a believable token count (``is_count`` wants an ``int`` up to
  10**12), and the readers use numbers for nothing else, so their answers are the same;
  use :func:`loads_exact` where the document itself matters (a body re-encoded).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Final

__all__ = ["HAS_ORJSON", "loads", "loads_exact"]

_ORJSON_MAX_DEPTH: Final = 254
"""Documents nested deeper than this are decoded again by the standard library (see the
module docstring): it handles this depth wherever the readers run, and real answers nest
less than 10 levels. It is orjson's own serialisation limit, which makes the check cheap."""

_WALK_FROM: Final = 16 * 1024
"""Bodies this long are checked for depth by counting their brackets (:func:`_few_brackets`)
and, past :data:`_ORJSON_MAX_DEPTH` of them, by walking their containers; shorter ones by
re-encoding them with orjson (~0.5 µs for 2 KB, but ~4 µs for 30 KB of text)."""

_orjson_loads: Callable[[bytes], object] | None = None
_orjson_dumps: Callable[[object], bytes] | None = None
try:
    import orjson

    _orjson_loads, _orjson_dumps = orjson.loads, orjson.dumps
except ImportError:  # optional: the standard library gives the same answers, slower
    pass

HAS_ORJSON: Final = _orjson_loads is not None
"""Whether :func:`loads` uses orjson."""


def loads_exact(body: bytes) -> object:
    """``json.loads(body)``: raises :class:`ValueError` (bad JSON or UTF-8) or
    :class:`RecursionError` (absurd nesting), as it does."""
    return json.loads(body)


def _loads_orjson(body: bytes) -> object:
    """:func:`loads` with orjson (see the module docstring for when it is not used)."""
    fast, dumps = _orjson_loads, _orjson_dumps
    assert fast is not None and dumps is not None  # chosen only when installed
    try:
        doc = fast(body)
    except ValueError:  # orjson.JSONDecodeError: let the standard library decide
        return json.loads(body)
    # Each level takes two bytes ([ and ]), so a short body cannot nest too deep. Counting
    # the brackets of a longer one with bytes.count would cost ~1 µs per KB; instead the
    # document is re-encoded, which orjson refuses past _ORJSON_MAX_DEPTH levels (~12 k
    # instructions for 2 KB). Long bodies: their brackets found one by one, else a walk.
    if len(body) > 2 * _ORJSON_MAX_DEPTH:
        if len(body) >= _WALK_FROM:
            # A long answer is mostly text: its few brackets are counted first (nesting
            # needs one per level), and only a body with many is walked.
            if not _few_brackets(body, _ORJSON_MAX_DEPTH) and _deeper_than(doc, _ORJSON_MAX_DEPTH):
                return json.loads(body)
        else:
            try:
                dumps(doc)
            except TypeError:  # orjson.JSONEncodeError: "Recursion limit reached"
                return json.loads(body)
    return doc


def _few_brackets(body: bytes, limit: int) -> bool:
    """Whether ``body`` holds at most ``limit`` opening brackets (``{`` and ``[``, in strings
    too): then nothing in it nests deeper than ``limit``.

    Found by ``find`` from one bracket to the next (memchr: it skips the text between them
    at a fraction of an instruction per byte), so this costs per bracket, ~1 k instructions
    each, not per byte: ``bytes.count`` is a plain loop over every byte (~5.6 instructions
    per byte: 306 k for both brackets of a 30 KB answer, against ~25 k this way;
    bench/usage_pieces.py, BENCHMARKS.md issue 8)."""
    find = body.find
    left = limit
    for bracket in (b"{", b"["):
        at = find(bracket)
        while at >= 0:
            left -= 1
            if left < 0:
                return False
            at = find(bracket, at + 1)
    return True


def _deeper_than(doc: object, limit: int) -> bool:
    """Whether ``doc`` nests containers more than ``limit`` levels deep (no recursion)."""
    # Level by level, each level's containers gathered by a comprehension: a real answer
    # has ~5 levels of ~3 containers, so this is a handful of C-speed loops (~1 µs).
    level: list[object] = [doc] if isinstance(doc, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[object] = []
        for value in level:
            assert isinstance(value, dict | list)
            items: Iterable[object] = value.values() if isinstance(value, dict) else value
            below += [item for item in items if type(item) is dict or type(item) is list]
        level = below
    return False


loads: Callable[[bytes], object] = _loads_orjson if HAS_ORJSON else loads_exact
"""Decode ``body`` for reading counts and names out of it: the same document as
``json.loads`` except that integers outside 64 bits may be floats (see the module
docstring). Raises :class:`ValueError` or :class:`RecursionError` as ``json.loads``."""

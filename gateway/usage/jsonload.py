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
  recursion limit allows (less than 1000). A body that might nest more than
  :data:`_ORJSON_MAX_BRACKETS` deep (it has more opening brackets than that, in strings or
  not) goes to the standard library.
- orjson turns an integer outside 64 bits into a float, the standard library keeps it an
  ``int``. Neither is a believable token count (``is_count`` wants an ``int`` up to
  10**12), and the readers use numbers for nothing else, so their answers are the same;
  use :func:`loads_exact` where the document itself matters (a body re-encoded).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

__all__ = ["HAS_ORJSON", "loads", "loads_exact"]

_ORJSON_MAX_BRACKETS: Final = 400
"""Bodies with more ``[`` plus ``{`` bytes than this skip orjson (see the module docstring):
the standard library handles this depth wherever the readers run, and real answers have far
fewer (a chat completion has ~10)."""

_orjson_loads: Callable[[bytes], object] | None = None
try:
    import orjson

    _orjson_loads = orjson.loads
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
    fast = _orjson_loads
    assert fast is not None  # chosen only when installed
    # Nesting deeper than the bound needs more opening brackets than that (cheap to count).
    if len(body) > _ORJSON_MAX_BRACKETS and (
        body.count(b"[") + body.count(b"{") > _ORJSON_MAX_BRACKETS
    ):
        return json.loads(body)
    try:
        return fast(body)
    except ValueError:  # orjson.JSONDecodeError: let the standard library decide
        return json.loads(body)


loads: Callable[[bytes], object] = _loads_orjson if HAS_ORJSON else loads_exact
"""Decode ``body`` for reading counts and names out of it: the same document as
``json.loads`` except that integers outside 64 bits may be floats (see the module
docstring). Raises :class:`ValueError` or :class:`RecursionError` as ``json.loads``."""

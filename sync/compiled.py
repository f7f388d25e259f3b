"""The sync job's optional C extension ``sync._entries`` (``_entries.c``), when it is built
and not switched off.

It does, in one pass each, what the worker did most per event in the interpreter: the
decode of a read of v2 entries (``decode_v2``, for sync/batch.py) and the batch's
reductions (``rollups`` and ``newest``, for sync/aggregate.py), and the order the writer
works a batch in (``org_order``, for sync/records.py). Each answers exactly what
the Python form it stands for answers, or None for an input outside its happy path (then
the Python form runs and its answer stands): tests/sync/test_compiled_decode.py and
tests/sync/test_sync_decode.py check both forms alike.

It is compiled by the normal install when a C compiler and the Python headers are there
(hatch_build.py); without it everything works the same, more slowly. Setting
``CREDITGATE_PURE_PYTHON=1`` before the process starts ignores it (as it does
gateway.usage's scan); :data:`COMPILED` says which form is in use. Callers read the
functions from this module at each call, so a test can switch one off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

from gateway.usage.topscan import PURE_PYTHON_ENV

__all__ = ["COMPILED", "decode_v2", "newest", "org_order", "rollups"]

decode_v2: Callable[[list[Any], Any, frozenset[str], int], tuple[Any, ...] | None] | None = None
"""``decode_v2(entries, times, kinds, max_digits)``: a read as sync/batch.py ``decode_each``
decodes it (ids, fields, flats, lines, days, empty bucket, usage, levels) and whether no
value holds a newline, a carriage return or a backslash (``Rows.clean``), or None."""

Reduced = tuple[list[str], ...]
rollups: Callable[[list[Any], list[str], frozenset[str]], Reduced | None] | None = None
"""``rollups(flats, days, request_kinds)``: sync/aggregate.py ``rollups``' columns, or None."""

newest: Callable[[list[Any]], tuple[dict[Any, Any], set[Any]] | None] | None = None
"""``newest(flats)``: sync/aggregate.py ``_newest_each``'s answer, or None."""

org_order: Callable[[list[Any]], list[int] | bool | None] | None = None
"""``org_order(flats)``: sync/records.py ``org_order_each``'s order, True for its None (the
entries together already), or None (not ours: the Python form runs)."""

if os.environ.get(PURE_PYTHON_ENV, "") in ("", "0"):
    try:
        from sync import _entries
    except ImportError:  # not compiled (no compiler at install): the Python forms alone
        pass
    else:
        decode_v2 = _entries.decode_v2
        rollups = _entries.rollups
        newest = _entries.newest
        org_order = _entries.org_order

COMPILED: Final = decode_v2 is not None
"""Whether the compiled forms are in use."""

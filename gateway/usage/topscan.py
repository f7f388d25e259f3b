"""The compiled top-level scan of JSON answers, when it is built and not switched off.

:func:`usage_from_json <gateway.usage.responses.usage_from_json>` reads only a few top-level
members of an answer (``usage``, ``model``, ...), yet decoding the whole body was most of
what reading usage cost. The C extension ``gateway.usage._topscan`` (``_topscan.c``) makes
one structural pass over the bytes instead, without building any Python object, and either
vouches that the body is a JSON object that ``json.loads`` decodes (to the same value) and
hands back its wanted top-level members as a small JSON object text, or answers ``None``
("don't know": anything outside a narrow happy path, such as invalid JSON, a BOM, invalid
UTF-8, a top-level key spelt with an escape, a top-level array, absurd nesting), after which
the pure-Python decode runs unchanged and its verdict stands.

Why a structural pass and not a search for ``"usage"``: a model-written object (a tool_use
input, JSON-mode content) can hold a key named ``usage``; only the nesting tells the
answer's own from the model's.

The extension is optional: it is compiled by the normal install when a C compiler and the
Python headers are there (hatch_build.py), and without it everything works the same, a
little slower. Setting ``CREDITGATE_PURE_PYTHON=1`` in the environment (before the gateway
starts) ignores it; :data:`COMPILED` says which form is in use.

For the answers of known shapes the extension goes one step further (:data:`counts`): it
reads the usage object's counts itself and hands back the :class:`~gateway.usage.model.Usage`
fields as a tuple, with no JSON decoded into Python objects at all; anything else it leaves
to the decode, as above.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final, Literal

from gateway.usage.model import Provider

__all__ = [
    "COMPILED",
    "PURE_PYTHON_ENV",
    "Priced",
    "UsageCounts",
    "counts",
    "priced",
    "scan",
    "stream_key",
]

PURE_PYTHON_ENV: Final = "CREDITGATE_PURE_PYTHON"
"""The environment variable that, set to anything but empty or ``0``, ignores the
extension."""

scan: Callable[[bytes, tuple[bytes, ...]], bytes | None] | None = None
"""``scan(body, keys)``: the last occurrence of each of ``keys`` among the top-level members
of the JSON object ``body``, as the text of a JSON object (``b'{"usage":{...},"model":"m"}'``,
the values' bytes exactly as in ``body``), or ``None`` when the body is outside the scan's
happy path. ``None`` itself when the extension is not in use."""

UsageCounts = tuple[Provider, str | None, int, int, int, int]
"""A :class:`~gateway.usage.model.Usage`'s fields in its order: provider, model, input,
cached input, output and reasoning tokens (what :func:`~gateway.usage.model.checked_usage`
takes)."""

counts: Callable[[bytes, int], UsageCounts | None] | None = None
"""``counts(body, mode)``: the usage of the JSON answer ``body`` as :data:`UsageCounts`, read
by the compiled pass for the known shapes (``mode``: 0 auto, 1 openai, 2 anthropic, 3 gemini;
gateway/usage/responses.py ``MODE_CODES``), exactly as ``usage_from_json`` reads it; ``None``
("don't know") for any other body, also one whose usage is missing or not believable: then
``usage_from_json`` decides. ``None`` itself when the extension is not in use."""

Priced = tuple[int, tuple[str], bytes, bytes | None, Provider, str | None, int, int, int, int]
"""A complete answer's usage priced and told (gateway/metering/usage_tap.py
``priced_counts``, the Python form): the tokens charged, the settle item's value as a
1-tuple, the ``X-Tokens-Cost`` and ``X-Tokens-Remaining`` values (``None``: no balance
known), then the :data:`UsageCounts`."""

priced: (
    Callable[
        [
            bytes,
            int,
            dict[str, tuple[int, int, int, int]],
            Callable[[str | None], tuple[int, int, int, int]],
            int | None,
            int | None,
            list[tuple[bytes, bytes]] | None,
        ],
        Priced | Literal[False] | None,
    ]
    | None
) = None
"""``priced(body, mode, memo, terms_for, maximum, left, head)``: :data:`counts` of ``body``, priced
as :meth:`PriceTable.cost_of <gateway.usage.prices.PriceTable.cost_of>` prices it (``memo``:
its terms per model, :meth:`~gateway.usage.prices.PriceTable.terms_memo`; ``terms_for``: its
:meth:`~gateway.usage.prices.PriceTable.terms_for`, called for a model not in ``memo``; at
most ``maximum``), with the settle value and the X-Tokens-* header values for a balance
``left`` (the remaining plus the hold) made from it, in one call: :data:`Priced`; ``None``
("don't know") whenever :data:`counts` says so, or a price or a charge is outside what it
computes in 128-bit integers: the Python form then decides. With ``head``, an answer's
headers (a list of pairs of bytes), first ``False`` when they are not surely those of a plain
JSON answer (the last Content-Encoding absent, empty or ``identity``, the last Content-Type
not ``text/event-stream``): the caller's own test then decides (``None`` says they are).
``None`` itself when the extension is not in use."""


def _stream_key(body: bytes) -> bool:
    # (find, not `in`: bytes' `in` first tries its argument as an int, and the TypeError it
    # makes and clears costs more than the search.)
    return body.find(b'"stream"') >= 0


stream_key: Callable[[bytes], bool] = _stream_key
"""``stream_key(body)``: whether the request body holds ``"stream"`` in quotes (a body
without the key cannot be a stream: spared the JSON decode); the compiled search (16 bytes
at a time, no argument parsing) when the extension is in use, else ``bytes.find``: the same
answer."""

if os.environ.get(PURE_PYTHON_ENV, "") in ("", "0"):
    try:
        from gateway.usage._topscan import priced as _compiled_priced
        from gateway.usage._topscan import scan as _compiled
        from gateway.usage._topscan import stream_key as _compiled_stream_key
        from gateway.usage._topscan import usage as _compiled_counts
    except ImportError:  # not compiled (no compiler at install): the pure-Python decode
        pass
    else:
        scan = _compiled
        counts = _compiled_counts
        priced = _compiled_priced
        stream_key = _compiled_stream_key

COMPILED: Final = scan is not None
"""Whether the compiled scan is in use."""

"""RESP, the Redis wire format, for the hot path: command arguments encoded once, reused.

hiredis spends ~65 ns per argument packing a command, and most of charge.lua's ~30
arguments are the same for every request of one org, user and route. An
:class:`ArgTemplate` encodes those once and leaves slots for the few values that change
per call; :meth:`ScriptRunner.run_encoded <gateway.redisio.connect.ScriptRunner>` sends
what :meth:`ArgTemplate.fill` returns. The pipelined runners put it on the wire as is; the
redis-py runner decodes it again (:func:`decode_args`).

An encoded run of arguments is RESP bulk strings without the array header
(``$<length>\\r\\n<bytes>\\r\\n`` each): the runner adds ``*<n>\\r\\n`` and the command name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, cast

import hiredis

__all__ = [
    "SLOT",
    "ArgTemplate",
    "ScriptArg",
    "decode_args",
    "encode_args",
    "evalsha_header",
    "pack_command",
]

ScriptArg = str | int | bytes

# hiredis' bundled stub types the argument as a 1-tuple; any tuple of args is accepted.
pack_command = cast("Callable[[tuple[ScriptArg, ...]], bytes]", hiredis.pack_command)

SLOT: Final = None
"""Marks, in the parts of an :class:`ArgTemplate`, an argument given to each ``fill``."""


def encode_args(args: Sequence[ScriptArg]) -> bytes:
    """``args`` as RESP bulk strings without the array header (``str`` as UTF-8, with
    lone surrogates as the bytes they escape, as ``surrogateescape`` decoding made them)."""
    try:
        packed = pack_command(tuple(args))
    except UnicodeEncodeError:
        packed = pack_command(
            tuple(a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a for a in args)
        )
    return packed[packed.index(b"\r\n") + 2 :]


def decode_args(encoded: bytes, count: int | None = None) -> list[bytes]:
    """The arguments of an encoded run (the first ``count`` of them, or all).

    Raises ``ValueError`` when ``encoded`` is not a run of bulk strings."""
    reader = hiredis.Reader()
    reader.feed(encoded)
    out: list[bytes] = []
    while count is None or len(out) < count:
        try:
            arg = reader.gets()
        except hiredis.ProtocolError as exc:
            raise ValueError(f"not RESP bulk strings: {exc}") from None
        if arg is False:
            break
        if not isinstance(arg, bytes):
            raise ValueError(f"not a RESP bulk string: {arg!r}")
        out.append(arg)
    if count is not None and len(out) < count:
        raise ValueError(f"{len(out)} arguments encoded, {count} expected")
    return out


def evalsha_header(sha: str, count: int) -> bytes:
    """The start of an EVALSHA of ``count`` encoded arguments (numkeys, keys, args):
    the array header, the command name and the SHA."""
    packed = pack_command(("EVALSHA", sha))
    return b"*%d%b" % (count + 2, packed[packed.index(b"\r\n") :])


# A template's ``fill``, built once per template: the constant runs ``c`` (one more than
# the slots) bound as closure cells, the values spliced in by one f-string, which CPython
# builds in one step (a %-format would parse the ~500 characters of a charge template on
# every call, ~0.5 µs; these only copy them, ~0.2 µs). One function per slot count keeps
# the fill of a request to a single Python call on the hot path. ``exact`` encodes the
# rare non-ASCII values byte by byte: with ASCII text (str.isascii is O(1)) every
# character is one byte, so the lengths written above were byte lengths.
Fill = Callable[[tuple[str, ...]], bytes]
_Exact = Callable[[tuple[str, ...]], bytes]


def _fill0(c: tuple[str, ...], exact: _Exact) -> Fill:
    (c0,) = c

    def fill(v: tuple[str, ...]) -> bytes:
        () = v
        return c0.encode() if c0.isascii() else exact(v)

    return fill


def _fill1(c: tuple[str, ...], exact: _Exact) -> Fill:
    c0, c1 = c

    def fill(v: tuple[str, ...]) -> bytes:
        (a,) = v
        text = f"{c0}${len(a)}\r\n{a}\r\n{c1}"
        return text.encode() if text.isascii() else exact(v)

    return fill


def _fill2(c: tuple[str, ...], exact: _Exact) -> Fill:
    c0, c1, c2 = c

    def fill(v: tuple[str, ...]) -> bytes:
        a, b = v
        text = f"{c0}${len(a)}\r\n{a}\r\n{c1}${len(b)}\r\n{b}\r\n{c2}"
        return text.encode() if text.isascii() else exact(v)

    return fill


def _fill3(c: tuple[str, ...], exact: _Exact) -> Fill:
    c0, c1, c2, c3 = c

    def fill(v: tuple[str, ...]) -> bytes:
        a, b, d = v
        text = f"{c0}${len(a)}\r\n{a}\r\n{c1}${len(b)}\r\n{b}\r\n{c2}${len(d)}\r\n{d}\r\n{c3}"
        return text.encode() if text.isascii() else exact(v)

    return fill


def _fill4(c: tuple[str, ...], exact: _Exact) -> Fill:
    c0, c1, c2, c3, c4 = c

    def fill(v: tuple[str, ...]) -> bytes:
        a, b, d, e = v
        text = (
            f"{c0}${len(a)}\r\n{a}\r\n{c1}${len(b)}\r\n{b}\r\n{c2}${len(d)}\r\n{d}\r\n"
            f"{c3}${len(e)}\r\n{e}\r\n{c4}"
        )
        return text.encode() if text.isascii() else exact(v)

    return fill


def _fill5(c: tuple[str, ...], exact: _Exact) -> Fill:
    c0, c1, c2, c3, c4, c5 = c

    def fill(v: tuple[str, ...]) -> bytes:
        a, b, d, e, g = v
        text = (
            f"{c0}${len(a)}\r\n{a}\r\n{c1}${len(b)}\r\n{b}\r\n{c2}${len(d)}\r\n{d}\r\n"
            f"{c3}${len(e)}\r\n{e}\r\n{c4}${len(g)}\r\n{g}\r\n{c5}"
        )
        return text.encode() if text.isascii() else exact(v)

    return fill


def _fill_any(c: tuple[str, ...], exact: _Exact) -> Fill:
    def fill(v: tuple[str, ...]) -> bytes:
        if len(v) != len(c) - 1:
            raise ValueError(f"{len(c) - 1} values expected, {len(v)} given")
        out = [c[0]]
        for value, const in zip(v, c[1:], strict=True):
            out += (f"${len(value)}\r\n{value}\r\n", const)
        text = "".join(out)
        return text.encode() if text.isascii() else exact(v)

    return fill


_FILLERS: tuple[Callable[[tuple[str, ...], _Exact], Fill], ...] = (
    _fill0, _fill1, _fill2, _fill3, _fill4, _fill5,
)  # fmt: skip


class ArgTemplate:
    """A run of command arguments encoded once, with slots for the values of each call.

    ``parts`` lists the arguments in order, :data:`SLOT` where a value comes from
    ``fill``. ``count`` is the number of arguments, what ``run_encoded`` takes with the
    encoded bytes.

    ``fill(values)`` (an attribute: a function built for this template, so that filling
    is one call) returns the encoded arguments with ``values`` (a tuple of exactly one
    ``str`` per slot, in order) in the slots; it raises ``ValueError`` when the number
    of values is not the number of slots.
    """

    __slots__ = ("_consts", "count", "fill", "slots")

    def __init__(self, parts: Sequence[ScriptArg | None]) -> None:
        self.count = len(parts)
        runs: list[list[ScriptArg]] = [[]]
        for part in parts:
            if part is SLOT:
                runs.append([])
            else:
                runs[-1].append(part)
        self.slots = len(runs) - 1
        # The constant runs between the slots, encoded (the exact path joins these) and as
        # text (the fast path fills them in with the values).
        self._consts = tuple(encode_args(run) if run else b"" for run in runs)
        texts = tuple(c.decode("utf-8", "surrogateescape") for c in self._consts)
        build = _FILLERS[self.slots] if self.slots < len(_FILLERS) else _fill_any
        self.fill: Fill = build(texts, self._fill_exactly)

    def _fill_exactly(self, values: tuple[str, ...]) -> bytes:
        """``fill`` for values that are not all ASCII: each encoded on its own."""
        if len(values) != self.slots:
            raise ValueError(f"{self.slots} values expected, {len(values)} given")
        pieces = [self._consts[0]]
        for value, const in zip(values, self._consts[1:], strict=True):
            pieces += (encode_args((value,)), const)
        return b"".join(pieces)

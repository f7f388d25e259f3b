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


# Template text with the slots filled: ``c`` is the template's constant runs as text (one
# more than the slots), ``v`` the values. Spelled out per slot count as f-strings, which
# CPython builds in one step: a %-format would parse the ~500 characters of a charge
# template on every call (~0.5 µs), these only copy them (~0.2 µs).
def _fill0(c: tuple[str, ...], v: tuple[str, ...]) -> str:
    () = v
    return c[0]


def _fill1(c: tuple[str, ...], v: tuple[str, ...]) -> str:
    (a,) = v
    return f"{c[0]}${len(a)}\r\n{a}\r\n{c[1]}"


def _fill2(c: tuple[str, ...], v: tuple[str, ...]) -> str:
    a, b = v
    return f"{c[0]}${len(a)}\r\n{a}\r\n{c[1]}${len(b)}\r\n{b}\r\n{c[2]}"


def _fill3(c: tuple[str, ...], v: tuple[str, ...]) -> str:
    a, b, d = v
    return f"{c[0]}${len(a)}\r\n{a}\r\n{c[1]}${len(b)}\r\n{b}\r\n{c[2]}${len(d)}\r\n{d}\r\n{c[3]}"


def _fill4(c: tuple[str, ...], v: tuple[str, ...]) -> str:
    a, b, d, e = v
    return (
        f"{c[0]}${len(a)}\r\n{a}\r\n{c[1]}${len(b)}\r\n{b}\r\n{c[2]}${len(d)}\r\n{d}\r\n"
        f"{c[3]}${len(e)}\r\n{e}\r\n{c[4]}"
    )


def _fill5(c: tuple[str, ...], v: tuple[str, ...]) -> str:
    a, b, d, e, g = v
    return (
        f"{c[0]}${len(a)}\r\n{a}\r\n{c[1]}${len(b)}\r\n{b}\r\n{c[2]}${len(d)}\r\n{d}\r\n"
        f"{c[3]}${len(e)}\r\n{e}\r\n{c[4]}${len(g)}\r\n{g}\r\n{c[5]}"
    )


def _fill_any(c: tuple[str, ...], v: tuple[str, ...]) -> str:
    if len(v) != len(c) - 1:
        raise ValueError(f"{len(c) - 1} values expected, {len(v)} given")
    out = [c[0]]
    for value, const in zip(v, c[1:], strict=True):
        out += (f"${len(value)}\r\n{value}\r\n", const)
    return "".join(out)


_FILLERS: tuple[Callable[..., str], ...] = (_fill0, _fill1, _fill2, _fill3, _fill4, _fill5)


class ArgTemplate:
    """A run of command arguments encoded once, with slots for the values of each call.

    ``parts`` lists the arguments in order, :data:`SLOT` where a value comes from
    :meth:`fill` (which takes a tuple of exactly one ``str`` per slot, in order). ``count`` is the
    number of arguments, what ``run_encoded`` takes with the encoded bytes.
    """

    __slots__ = ("_consts", "_filler", "_texts", "count", "slots")

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
        self._texts = tuple(c.decode("utf-8", "surrogateescape") for c in self._consts)
        self._filler = _FILLERS[self.slots] if self.slots < len(_FILLERS) else _fill_any

    def fill(self, values: tuple[str, ...]) -> bytes:
        """The encoded arguments with ``values`` (one per slot, in order) in the slots.

        Raises ``ValueError`` when the number of values is not the number of slots."""
        text = self._filler(self._texts, values)
        # ASCII (str.isascii is O(1)): every character is one byte, so len() above was the
        # byte length. Otherwise (a non-ASCII org, user or request id) encode exactly.
        if text.isascii():
            return text.encode()
        return self._fill_exactly(values)

    def _fill_exactly(self, values: tuple[str, ...]) -> bytes:
        if len(values) != self.slots:
            raise ValueError(f"{self.slots} values expected, {len(values)} given")
        pieces = [self._consts[0]]
        for value, const in zip(values, self._consts[1:], strict=True):
            pieces += (encode_args((value,)), const)
        return b"".join(pieces)

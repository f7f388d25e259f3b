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
from itertools import chain
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


# ``%`` arguments of a fill's slot values: (length, value) per slot, flattened. Spelled out
# for the common counts (a call costs ~100 ns less than the generic chain below).
_INTERLEAVE: dict[int, Callable[..., tuple[int | str, ...]]] = {
    0: lambda: (),
    1: lambda a: (len(a), a),
    2: lambda a, b: (len(a), a, len(b), b),
    3: lambda a, b, c: (len(a), a, len(b), b, len(c), c),
    4: lambda a, b, c, d: (len(a), a, len(b), b, len(c), c, len(d), d),
    5: lambda a, b, c, d, e: (len(a), a, len(b), b, len(c), c, len(d), d, len(e), e),
}


def _interleave_any(*values: str) -> tuple[int | str, ...]:
    return tuple(chain.from_iterable(zip(map(len, values), values, strict=True)))


class ArgTemplate:
    """A run of command arguments encoded once, with slots for the values of each call.

    ``parts`` lists the arguments in order, :data:`SLOT` where a value comes from
    :meth:`fill` (which takes exactly one ``str`` per slot, in order). ``count`` is the
    number of arguments, what ``run_encoded`` takes with the encoded bytes.
    """

    __slots__ = ("_consts", "_interleave", "_text", "count", "slots")

    def __init__(self, parts: Sequence[ScriptArg | None]) -> None:
        self.count = len(parts)
        runs: list[list[ScriptArg]] = [[]]
        for part in parts:
            if part is SLOT:
                runs.append([])
            else:
                runs[-1].append(part)
        self.slots = len(runs) - 1
        # The constant runs between the slots, encoded (the slow path joins these) ...
        self._consts = tuple(encode_args(run) if run else b"" for run in runs)
        # ... and the whole template as one %-format string for the fast path.
        self._text = "$%d\r\n%s\r\n".join(
            c.decode("utf-8", "surrogateescape").replace("%", "%%") for c in self._consts
        )
        self._interleave = _INTERLEAVE.get(self.slots, _interleave_any)

    def fill(self, *values: str) -> bytes:
        """The encoded arguments with ``values`` in the slots."""
        text = self._text % self._interleave(*values)
        # ASCII (str.isascii is O(1)): every character is one byte, so len() above was the
        # byte length. Otherwise (a non-ASCII org, user or request id) encode exactly.
        if text.isascii():
            return text.encode()
        return self._fill_exactly(values)

    def _fill_exactly(self, values: Sequence[str]) -> bytes:
        if len(values) != self.slots:
            raise TypeError(f"{self.slots} values expected, {len(values)} given")
        pieces = [self._consts[0]]
        for value, const in zip(values, self._consts[1:], strict=True):
            pieces += (encode_args((value,)), const)
        return b"".join(pieces)

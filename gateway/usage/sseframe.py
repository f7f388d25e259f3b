"""Incremental, bounded server-sent-events framing (the WHATWG ``text/event-stream`` rules).

Bytes go in as they arrive, split anywhere; whole events come out through a callback. Line
ends are CRLF, LF or CR (a CR at the end of one chunk and an LF at the start of the next are
one line end); ``data:`` lines join with LF; comments and unknown fields are dropped; a
leading BOM is skipped. Splitting only at CR and LF, which never occur inside a multi-byte
UTF-8 character, keeps characters whole without decoding anything here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

_BOM: Final = b"\xef\xbb\xbf"


class SseReader:
    """Calls ``on_event(event_name, data)`` for each complete event fed to it.

    At most ``max_line`` bytes of an unfinished line and ``max_line`` bytes of an unfinished
    event's data are held; past either bound the reader stops for good and sets
    :attr:`stopped`, so a hostile stream costs bounded memory.
    """

    __slots__ = (
        "_data",
        "_data_size",
        "_event",
        "_max",
        "_on_event",
        "_partial",
        "_skip_lf",
        "_started",
        "stopped",
    )

    def __init__(self, on_event: Callable[[bytes, bytes], None], max_line: int) -> None:
        self._on_event = on_event
        self._max = max_line
        self._partial = bytearray()  # the line not yet ended
        self._skip_lf = False  # the last chunk ended in CR: a leading LF ends nothing
        self._started = False  # a BOM is skipped on the first line only
        self._event = b""
        self._data: list[bytes] = []
        self._data_size = 0
        self.stopped = False
        """True once a line or an event passed ``max_line`` (or :meth:`stop` was called):
        nothing more is read."""

    def feed(self, chunk: bytes) -> None:
        """Read the next bytes of the stream."""
        if self.stopped:
            return
        start, size = 0, len(chunk)
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                start = 1
        # memchr scans rather than a regex over every byte; with no CR the CR scan runs once.
        lf = chunk.find(b"\n", start)
        cr = chunk.find(b"\r", start)
        while lf >= 0 or cr >= 0:
            if cr < 0 or 0 <= lf < cr:
                end = after = lf
                after += 1
                lf = chunk.find(b"\n", after)
            else:
                end = after = cr
                after += 1
                if after == size:
                    self._skip_lf = True  # the LF of this CRLF may start the next chunk
                elif chunk[after] == 0x0A:
                    after += 1
                    lf = chunk.find(b"\n", after)
                cr = chunk.find(b"\r", after)
            if self._partial:
                self._partial += chunk[start:end]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = chunk[start:end]
            start = after
            if len(line) > self._max:
                self.stop()
                return
            if line or not self._started:
                self._line(line)
                if self.stopped:
                    return
            else:
                self._dispatch()
        if start < size:
            if len(self._partial) + size - start > self._max:
                self.stop()
                return
            self._partial += chunk[start:]

    def close(self) -> None:
        """End of stream: an unterminated last line and an unfinished event still go out.

        (Browsers drop them; a meter would rather see them, and the consumer only believes
        data that parses whole.)
        """
        if self.stopped:
            return
        if self._partial:
            line = bytes(self._partial)
            self._partial.clear()
            self._line(line)
        self._dispatch()

    def _line(self, line: bytes) -> None:
        if not self._started:
            self._started = True
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if not line:
            self._dispatch()
            return
        if line.startswith(b"data: "):  # nearly every line: skip the general parse
            value = line[6:]
            self._data_size += len(value) + 1
            if self._data_size > self._max:
                self.stop()
                return
            self._data.append(value)
            return
        if line[:1] == b":":  # a comment, e.g. a keep-alive
            return
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            self._data_size += len(value) + 1
            if self._data_size > self._max:
                self.stop()
                return
            self._data.append(value)
        elif name == b"event":
            self._event = value
        # id, retry and unknown fields are not needed by any consumer here.

    def _dispatch(self) -> None:
        lines, event = self._data, self._event
        self._data, self._data_size, self._event = [], 0, b""
        if lines:
            self._on_event(event, lines[0] if len(lines) == 1 else b"\n".join(lines))

    def stop(self) -> None:
        """Read nothing more and let go of what is held."""
        self.stopped = True
        self._partial = bytearray()
        self._data, self._data_size = [], 0

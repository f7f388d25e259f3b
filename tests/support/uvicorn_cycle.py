"""uvicorn's ``RequestResponseCycle`` over a fake transport, without a server or socket:
the cycle the response-head fast path (tests/commands/test_response_cycle.py) and the
response splice (tests/proxy/test_splice.py) are compared against, byte for byte."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

__all__ = ["RecordingTransport", "uvicorn_cycle"]


class RecordingTransport:
    """What a cycle writes, write by write, and a write buffer that fills until the test
    drains it (past ``high_water`` it pauses the cycle's flow, as asyncio's transports do)."""

    def __init__(self, high_water: int = 1 << 30) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0
        self.high_water = high_water
        self.protocol_paused: Callable[[], None] | None = None
        self.closing = False

    @property
    def out(self) -> bytes:
        """Every byte written so far."""
        return b"".join(self.writes)

    def write(self, data: bytes) -> None:
        """Records ``data``; pauses the flow once the buffer is past the high water mark."""
        self.writes.append(bytes(data))
        self.buffered += len(data)
        if self.buffered > self.high_water and self.protocol_paused is not None:
            self.protocol_paused()

    def is_closing(self) -> bool:
        """Whether the cycle closed it."""
        return self.closing

    def close(self) -> None:
        """Marks it closed."""
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Nothing: no socket, no peer."""
        return default


def uvicorn_cycle(
    method: str = "GET",
    keep_alive: bool = True,
    request_headers: list[tuple[bytes, bytes]] | None = None,
    default_headers: list[tuple[bytes, bytes]] | None = None,
    high_water: int = 1 << 30,
    on_response: Callable[[], None] = lambda: None,
) -> tuple[RequestResponseCycle, RecordingTransport]:
    """A fresh cycle of one request (``method``, ``request_headers``) as uvicorn's httptools
    protocol builds it, writing to a new :class:`RecordingTransport`."""
    transport = RecordingTransport(high_water)
    flow = FlowControl(transport)  # type: ignore[arg-type]
    transport.protocol_paused = flow.pause_writing
    scope: Any = {"type": "http", "method": method, "path": "/", "headers": request_headers or []}
    cycle = RequestResponseCycle(
        scope=scope, transport=transport, flow=flow,  # type: ignore[arg-type]
        logger=logging.getLogger("test"), access_logger=logging.getLogger("test"),
        access_log=False, default_headers=default_headers or [], message_event=asyncio.Event(),
        expect_100_continue=False, keep_alive=keep_alive, on_response=on_response,
    )  # fmt: skip
    return cycle, transport

"""A request served by ``creditgate serve``'s protocol leaves no reference cycle behind.

The protocol (gateway/commands/limited_protocol.py) puts a response splice over each
request's cycle in the request's scope (gateway/commands/splice.py); the cycle holds the
scope. A splice that held its cycle made every request a cycle of ~16 objects (the cycle,
its scope, state and extensions dicts, its ``asyncio.Event``...), freed only by the cycle
collector, whose passes cost a proxied short request ~30k instructions (BENCHMARKS.md
section 2c). This test drives keep-alive requests through the protocol on an in-memory
transport with collection switched off and counts what the collector finds.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from uvicorn.config import Config as UvicornConfig
from uvicorn.server import ServerState

from gateway.commands.limited_protocol import LimitedHttpToolsProtocol
from gateway.commands.splice import UvicornSplice
from gateway.config.schema import ServerConfig
from gateway.core.splice import RESPONSE_SPLICE

REQUESTS = 300
AT_MOST = REQUESTS // 10  # a cycle per request would be thousands of objects
BODY = b'{"ok":true}'
REQUEST = (
    b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nUser-Agent: t\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


class _Transport(asyncio.Transport):
    """The client's side in memory: counts complete answers."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0
        self.out = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def write(self, data: Any) -> None:
        self.out += data
        if bytes(data).endswith(BODY):
            self.answers += 1

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert isinstance(scope["extensions"][RESPONSE_SPLICE], UvicornSplice)
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def connected(app: Any) -> tuple[LimitedHttpToolsProtocol, _Transport]:
    """serve's protocol in front of ``app``, connected to an in-memory client."""
    config = UvicornConfig(
        app, loop="none", lifespan="off", access_log=False, server_header=False,
        date_header=False, proxy_headers=False,
    )  # fmt: skip
    config.load()
    transport = _Transport()
    protocol = LimitedHttpToolsProtocol(
        config, ServerState(), {}, asyncio.get_running_loop(), limits=ServerConfig()
    )
    protocol.connection_made(transport)
    return protocol, transport


async def _serve(
    protocol: LimitedHttpToolsProtocol, transport: _Transport, count: int, request: bytes = REQUEST
) -> None:
    for _ in range(count):
        before = transport.answers
        protocol.data_received(request)
        for _ in range(50):
            if transport.answers > before:
                break
            await asyncio.sleep(0)
        assert transport.answers == before + 1, bytes(transport.out[-300:])


async def test_a_served_request_leaves_no_reference_cycle() -> None:
    protocol, transport = connected(_app)
    await _serve(protocol, transport, 20)  # warm-up
    gc.collect()
    gc.disable()
    try:
        await _serve(protocol, transport, REQUESTS)
        for _ in range(5):
            await asyncio.sleep(0)  # the last request's task ends
        found = gc.collect()
    finally:
        gc.enable()
        protocol.connection_lost(None)
    assert found <= AT_MOST, f"{found} objects in reference cycles after {REQUESTS} requests"


class _CountingLoop:
    """The running loop, counting the timers the protocol asks it for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.timers = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_later(delay, callback, *args)

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_at(when, callback, *args)


def _protocol(keep_alive: float) -> tuple[LimitedHttpToolsProtocol, _Transport, _CountingLoop]:
    config = UvicornConfig(
        _app, loop="none", lifespan="off", access_log=False, server_header=False,
        date_header=False, proxy_headers=False,
    )  # fmt: skip
    config.load()
    loop = _CountingLoop(asyncio.get_running_loop())
    limits = ServerConfig(keep_alive_timeout_seconds=keep_alive)
    protocol = LimitedHttpToolsProtocol(
        config,
        ServerState(),
        {},
        loop,  # type: ignore[arg-type]
        limits=limits,
    )
    transport = _Transport()
    protocol.connection_made(transport)
    return protocol, transport, loop


async def test_keep_alive_requests_share_one_idle_timer() -> None:
    """uvicorn made and cancelled a keep-alive timer per response; serve's protocol keeps one
    per connection, re-armed only when it fires."""
    protocol, transport, loop = _protocol(30.0)
    await _serve(protocol, transport, 50)
    # The header deadline connection_made arms, and one idle timer (whole reads: no
    # deadline per request).
    assert loop.timers == 2
    assert not transport.closed
    protocol.connection_lost(None)


async def test_an_idle_connection_closes_after_the_keep_alive_timeout_not_a_busy_one() -> None:
    protocol, transport, _ = _protocol(0.3)
    start = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - start < 0.7:  # busy past two timeouts
        await _serve(protocol, transport, 1)
        await asyncio.sleep(0.1)  # idle, but shorter than the timeout
        assert not transport.closed
    last = asyncio.get_running_loop().time()
    while not transport.closed:
        await asyncio.sleep(0.01)
        assert asyncio.get_running_loop().time() - last < 1.0
    idle = asyncio.get_running_loop().time() - last
    assert 0.15 <= idle <= 0.5, idle  # 0.3 s after the last response (less the 0.1 s slept)
    protocol.connection_lost(None)


async def test_a_response_in_progress_is_not_cut_by_the_idle_timer() -> None:
    """Bytes of a request arrived: the connection is not idle while the app works."""
    gate = asyncio.Event()

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await gate.wait()
        await _app(scope, receive, send)

    protocol, transport, _ = _protocol(0.2)
    protocol.app = slow
    await _serve_started(protocol, transport)
    await asyncio.sleep(0.5)  # the timer armed by the first response fires meanwhile
    assert not transport.closed
    gate.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert transport.answers == 2 and not transport.closed
    await asyncio.sleep(0.4)
    assert transport.closed  # idle after it: closed
    protocol.connection_lost(None)


async def _serve_started(protocol: LimitedHttpToolsProtocol, transport: _Transport) -> None:
    """One request answered at once (arms the idle timer), then one the app holds."""
    app = protocol.app
    protocol.app = _app
    await _serve(protocol, transport, 1)
    protocol.app = app
    protocol.data_received(REQUEST)
    await asyncio.sleep(0)

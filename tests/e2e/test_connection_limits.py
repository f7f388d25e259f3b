"""Connection limits of the served gateway (``server:``), tried over raw sockets.

The gateway is GatewayApp served by uvicorn with ``server_options(config)`` (what ``serve``
and ``demo`` use; tests/support/served_gateway.py) on a free 127.0.0.1 port, in front of
a real upstream; a counting wrapper around the app proves that a refused request never
reaches it (so neither the upstream nor Redis). ``creditgate demo`` and ``creditgate
serve`` are also tried as real processes.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.commands.server import GatewayApp
from gateway.config import ConfigError, parse_config
from gateway.metering.gate import CreditGate
from tests.support.reference import REFERENCE_YAML, reference_config
from tests.support.served_gateway import served
from tests.support.upstream_app import app as echo_upstream
from tests.support.upstream_app import serve_in_thread

CREDITGATE = Path(sys.executable).parent / "creditgate"
SHORT = {"header_read_timeout_seconds": 0.5, "keep_alive_timeout_seconds": 0.5}


class Counting:
    """ASGI wrapper counting the HTTP requests that reach the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.calls += 1
        await self.app(scope, receive, send)


@contextmanager
def gateway(upstream: str, **server: Any) -> Iterator[tuple[int, Counting]]:
    """The gateway in front of ``upstream`` with short timeouts and ``server`` overrides."""
    config = reference_config(upstream=upstream, server={**SHORT, **server})
    app = Counting(GatewayApp(CreditGate(config), sync=False))
    with served(app, config) as port:
        yield port, app


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread(echo_upstream) as url:
        yield url


def exchange(port: int, data: bytes, *, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes (or ``wait`` passes); (reply, seconds).

    A reset is an end too (the reply read so far is returned). ``b"<open>"`` is appended
    when the connection was still open after ``wait`` seconds.
    """
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(wait)
        # Refused while we were still sending: read what it said.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(data)
        reply = b""
        try:
            while chunk := conn.recv(65536):
                reply += chunk
        except TimeoutError:
            reply += b"<open>"
        except ConnectionResetError:
            pass
    return reply, time.monotonic() - start


def request(*headers: bytes, target: bytes = b"/echo/x", close: bool = True) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: gw", *headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply[9:12])


# --- header count and size ---------------------------------------------------------------


def test_header_count_over_the_limit_is_431_and_never_reaches_the_app(upstream: str) -> None:
    with gateway(upstream, max_request_headers=20) as (port, app):
        # Host and Connection count: 18 more make 20, the limit.
        at_limit = [b"X-H%d: v" % i for i in range(18)]
        reply, _ = exchange(port, request(*at_limit))
        assert status(reply) == 200 and app.calls == 1
        reply, _ = exchange(port, request(*at_limit, b"X-One-More: v"))
        assert status(reply) == 431
        assert b"more than 20" in reply and b"connection: close" in reply.lower()
        assert app.calls == 1


def test_two_thousand_headers_are_refused_by_default(upstream: str) -> None:
    with gateway(upstream) as (port, app):
        reply, _ = exchange(port, request(*(b"X-H%d: v" % i for i in range(2000))))
        assert status(reply) == 431
        assert app.calls == 0


def test_header_bytes_over_the_limit_are_431(upstream: str) -> None:
    with gateway(upstream, max_request_header_bytes=8192) as (port, app):
        reply, _ = exchange(port, request(b"X-Big: " + b"a" * 7000))
        assert status(reply) == 200 and app.calls == 1
        reply, _ = exchange(port, request(b"X-Big: " + b"a" * 9000))
        assert status(reply) == 431 and b"more than 8192 bytes" in reply
        # Many small headers add up; so does a long request target.
        reply, _ = exchange(port, request(*(b"X-H%d: %s" % (i, b"b" * 90) for i in range(90))))
        assert status(reply) == 431
        reply, _ = exchange(port, request(target=b"/echo/" + b"p" * 9000))
        assert status(reply) == 431
        assert app.calls == 1


def test_a_20_mb_header_is_refused_early_and_never_forwarded(upstream: str) -> None:
    with gateway(upstream) as (port, app):
        huge = request(b"X-Big: " + b"a" * 20_000_000)
        reply, seconds = exchange(port, huge, wait=30)
        # The client reads the 431 (lingering close), and the server stops reading long
        # before 20 MB: the send either finished into socket buffers or was cut off.
        assert status(reply) == 431
        assert app.calls == 0
        assert seconds < 10


def test_pipelined_requests_still_work(upstream: str) -> None:
    with gateway(upstream, max_request_header_bytes=8192) as (port, app):
        two = request(close=False) + request(close=True)
        reply, _ = exchange(port, two)
        assert reply.count(b"HTTP/1.1 200 OK") == 2
        # A body larger than the header limit, in the same reads as the next request's
        # headers, is not counted as header bytes.
        body = b"x" * 100_000
        post = b"POST /echo/x HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % len(body)
        reply, _ = exchange(port, post + body + request(close=True))
        assert reply.count(b"HTTP/1.1 200 OK") == 2
        assert app.calls == 4


# --- timeouts ------------------------------------------------------------------------------


def test_a_silent_connection_is_closed_within_the_header_timeout(upstream: str) -> None:
    with gateway(upstream) as (port, app):
        reply, seconds = exchange(port, b"", wait=5)
        assert reply == b""  # closed without a word: no request was started
        assert 0.4 < seconds < 1.5
        reply, seconds = exchange(port, b"\r\n", wait=5)  # a stray line end is no request
        assert b"<open>" not in reply and seconds < 1.5
        assert app.calls == 0


def test_half_a_request_line_gets_408_within_the_header_timeout(upstream: str) -> None:
    with gateway(upstream) as (port, app):
        reply, seconds = exchange(port, b"GET /echo/x HT", wait=5)
        assert status(reply) == 408
        assert 0.4 < seconds < 1.5
        assert app.calls == 0


def test_a_trickling_client_is_cut_off_at_the_header_deadline(upstream: str) -> None:
    with gateway(upstream) as (port, app):
        start = time.monotonic()
        reply = b""
        with socket.create_connection(("127.0.0.1", port)) as conn:
            for byte in request():  # one byte every 50 ms: each one is "progress"
                conn.sendall(bytes([byte]))
                readable, _, _ = select.select([conn], [], [], 0.05)
                if readable:
                    reply = conn.recv(65536)
                    break
        assert status(reply) == 408
        assert time.monotonic() - start < 1.5
        assert app.calls == 0


def test_an_idle_keep_alive_connection_is_closed(upstream: str) -> None:
    with gateway(upstream) as (port, app), socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(5)
        for _ in range(2):  # the connection is reused while it is not idle too long
            conn.sendall(request(close=False))
            head = conn.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head[:100]
            time.sleep(0.2)
        start = time.monotonic()
        rest = b""
        while chunk := conn.recv(65536):
            rest += chunk
        assert 0.2 < time.monotonic() - start < 1.5
        assert app.calls == 2


def test_a_slow_response_is_not_cut_by_the_header_timeout(upstream: str) -> None:
    with gateway(upstream) as (port, _):
        # The upstream takes 1.2 s, longer than both timeouts: they are about the client.
        reply, _ = exchange(port, request(target=b"/slow?delay=1.2"), wait=10)
        assert status(reply) == 200


# --- the real commands ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the command exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the command did not start listening")


@contextmanager
def running(*args: str) -> Iterator[int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITGATE_")}
    proc = subprocess.Popen(
        [str(CREDITGATE), *args, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        wait_listening(proc, port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_creditgate_demo_applies_the_limits() -> None:
    with running("demo", "--no-postgres") as port:
        reply, _ = exchange(port, request(*(b"X-H%d: v" % i for i in range(200))))
        assert status(reply) == 431


def test_creditgate_serve_applies_the_limits(tmp_path: Path, upstream: str) -> None:
    data = yaml.safe_load(REFERENCE_YAML)
    data.update(upstream=upstream, server=SHORT)
    path = tmp_path / "creditgate.yaml"
    path.write_text(yaml.safe_dump(data))
    with running("serve", "--config", str(path), "--no-sync", "--log-level", "warning") as port:
        reply, _ = exchange(port, request(*(b"X-H%d: v" % i for i in range(200))))
        assert status(reply) == 431
        reply, seconds = exchange(port, b"GET /echo/x HT", wait=5)
        assert status(reply) == 408 and seconds < 1.5


# --- configuration ---------------------------------------------------------------------------


def test_server_keys_have_defaults_and_are_checked_at_load() -> None:
    assert reference_config().server.model_dump() == {
        "max_request_header_bytes": 65536,
        "max_request_headers": 100,
        "header_read_timeout_seconds": 10.0,
        "keep_alive_timeout_seconds": 5.0,
    }
    data = yaml.safe_load(REFERENCE_YAML)
    data["server"] = {
        "max_request_header_bytes": 100,
        "max_request_headers": 0,
        "header_read_timeout_seconds": 0,
        "keep_alive_timeout_seconds": -1,
    }
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(data), "limits.yaml")
    assert info.value.errors == [
        "limits.yaml: server.max_request_header_bytes: must be at least 1024, got 100",
        "limits.yaml: server.max_request_headers: must be positive, got 0",
        "limits.yaml: server.header_read_timeout_seconds: must be positive, got 0.0",
        "limits.yaml: server.keep_alive_timeout_seconds: must be positive, got -1.0",
    ]

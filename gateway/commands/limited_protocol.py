"""uvicorn's httptools HTTP/1.1 protocol with the connection limits of ``server:``.

uvicorn alone (the httptools protocol that ``serve`` and ``demo`` use) reads request
headers of any size and number, keeps a connection that never finishes its headers (or
never sends a byte) open forever, and only times out idle connections after a response.
This subclass adds, per connection:

- ``max_request_header_bytes``: the request line and headers together. Reads that fall
  entirely inside one request's headers are counted as they arrive, so a 20 MB header is
  refused once about the limit (plus one read) is in memory; when the headers are
  complete, their exact size is checked (only when the reads they came in could exceed it);
- ``max_request_headers``: header fields per request, checked when the headers are
  complete (their memory is bounded by the size limit meanwhile);
- ``header_read_timeout_seconds``: from the connection's opening, or from the read that
  brings a later request's first byte, to the end of that request's headers (a slowloris
  client that trickles bytes is cut off too: data does not move the deadline);
- ``keep_alive_timeout_seconds``: the idle timeout after a response, as uvicorn's own. uvicorn
  arms a timer at the end of every response and cancels it when the next request's bytes
  arrive (a timer made and cancelled per request); here one timer per connection is kept
  armed and, when it fires, closes the connection if it has been idle that long, or is
  armed again for the rest of the wait (idle), or left unarmed (busy: the end of the next
  response arms it).

Over a size limit the client gets 431 (Request Header Fields Too Large), at the header
deadline 408 (Request Timeout) if it had started a request; either way the connection then
closes and nothing reaches the app (so neither the upstream nor Redis). The response is
followed by a lingering close (our side shut for writing, the client's remaining bytes read
and dropped for a moment) so that the client reads the status instead of a reset.

The usual request, whole in one read, costs two overridden callbacks and no timer of its
own (uvicorn's keep-alive timer per response is gone too: see above), and leaves no
reference cycle behind (the response splice holds its cycle weakly).
Each keep-alive request's cycle sends its response head the cheaper way of
gateway/commands/response_cycle.py (the same bytes, every header still checked). Each
request's scope also gets the response splice (``scope["extensions"]``; see
gateway/core/splice.py and gateway/commands/splice.py), through which a stream's body
pieces can reach the connection without one ASGI ``send`` each.

It relies on uvicorn's ``HttpToolsProtocol`` (its ``on_header``, ``on_url``, ``headers``
and ``url``, its upgrade and 400 handling; its ``data_received`` is repeated here to tell
our refusals from parser errors), which tests/e2e/test_connection_limits.py covers against
a real server. Its per-request callbacks (``on_message_begin``, ``on_headers_complete``,
``on_body``, ``on_message_complete``, ``_start_asgi_task``) are uvicorn 0.55's, inlined
here: one Python frame each instead of ours calling uvicorn's, a keep-alive request's
cycle made a ``FastCycle`` directly, a request target's parts kept per target, and a task
for ``HTTP_CALL``'s call without ``run_asgi``'s coroutine (``FastCycle.run_direct``).
tests/commands/test_protocol_equivalence.py drives the same reads through uvicorn's own
protocol and this one and compares what the app sees and what the client gets (against
uvicorn 0.30 too, the oldest ``pyproject.toml`` allows).
"""

from __future__ import annotations

import asyncio
import types
import urllib.parse
from typing import Any

import httptools
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from gateway.commands.response_cycle import CLOSE as _CLOSE
from gateway.commands.response_cycle import FastCycle, fast_cycle
from gateway.commands.splice import UvicornSplice
from gateway.config.schema import ServerConfig
from gateway.core.splice import RESPONSE_SPLICE

# After a refusal, how long the client's remaining bytes are read and dropped before the
# connection is closed anyway (a client that keeps sending gets no more of our time).
LINGER_SECONDS = 2.0

HTTP_CALL = "http_call"
"""An app may offer, under this attribute, what to call for each HTTP request instead of
itself: ``app.http_call(scope, receive, send)``, a plain function returning the awaitable
of the endpoint it picks (GatewayApp: creditgate's own endpoints or the metered upstream).
The request's task then runs one coroutine level fewer, a level every resume of the task
passes through (the charge's reply, the upstream's). Websockets still get the app itself."""


# A request target's (path, raw_path, query_string), as uvicorn's on_headers_complete
# makes them, kept per target (with no root_path): a client asks for the same few targets,
# and a dict lookup is cheaper than parsing, decoding and unquoting each time. Bounded:
# emptied when full; long targets never kept.
_URLS: dict[bytes, tuple[str, bytes, bytes]] = {}
_URLS_MAX = 256
_URL_LONG = 512


def _url_parts(url: bytes, root_path: str) -> tuple[str, bytes, bytes]:
    """``url``'s (path, raw_path, query_string) under ``root_path``, as uvicorn's
    ``on_headers_complete`` makes them (``httptools.parse_url`` refuses a bad target:
    a 400); kept in ``_URLS`` when there is no root_path."""
    parsed_url = httptools.parse_url(url)
    raw_path = parsed_url.path
    path = raw_path.decode("ascii")
    if "%" in path:
        path = urllib.parse.unquote(path)
    parts = (
        root_path + path,
        root_path.encode("ascii") + raw_path,
        parsed_url.query or b"",
    )
    if not root_path and len(url) <= _URL_LONG:
        if len(_URLS) >= _URLS_MAX:
            _URLS.clear()
        _URLS[url] = parts
    return parts


def _spec_version() -> str:
    """The ASGI HTTP spec version the installed uvicorn's scope states (2.4 in 0.30, 2.3
    in 0.55): read once from its own ``on_message_begin``, so that the scope made here
    states the same."""
    config = types.SimpleNamespace(asgi_version="3.0")
    stub = types.SimpleNamespace(
        config=config, asgi_version="3.0", server=None, client=None, scheme="http",
        root_path="", app_state={},
    )  # fmt: skip
    try:
        HttpToolsProtocol.on_message_begin(stub)  # type: ignore[arg-type]
        return str(stub.scope["asgi"]["spec_version"])
    except Exception:  # another uvicorn's shape: the spec version uvicorn 0.55 states
        return "2.3"


_SPEC_VERSION = _spec_version()


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request over a limit."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` enforcing ``limits`` (see the module docstring)."""

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ServerConfig,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        call = getattr(self.app, HTTP_CALL, None)
        if call is not None:  # see HTTP_CALL
            self.app = call
        # The app whose call makes the request's coroutine itself (a plain picker: see
        # HTTP_CALL): a FastCycle runs it without run_asgi's coroutine (run_direct).
        self._direct = call
        self.limits = limits
        # uvicorn's own idle timeout between requests (its Config types it as int).
        self.timeout_keep_alive = limits.keep_alive_timeout_seconds  # type: ignore[assignment]
        self._deadline: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None  # when the last response ended, if idle since
        self._linger: asyncio.TimerHandle | None = None
        self._in_headers = False  # a request line has begun, its headers are not complete
        self._requests = 0
        self._read = 0  # the length of the read being parsed
        self._seen = 0  # the reads since the request began: at least its header bytes
        self._raw = 0  # the reads entirely inside its headers: at most its header bytes
        self._refusal: tuple[int, str] | None = None
        # A keep-alive request's cycle may be a FastCycle (response_cycle.py
        # fast_cycle_allowed) without an access log (fixed for the connection's life) and
        # without default headers of uvicorn's own (``serve`` has neither).
        self._fast_cycles = not self.access_log
        self.asgi_version = config.asgi_version  # (uvicorn 0.30's protocol has no copy)
        self._reset_contextvars = bool(getattr(config, "reset_contextvars", False))
        self._task_done = self.tasks.discard

    # --- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the header deadline: a client that connects must send a request."""
        super().connection_made(transport)
        # What its FastCycles' send returns when done at once (response_cycle.py).
        self._done: asyncio.Future[None] = self.loop.create_future()
        self._done.set_result(None)
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel the timers of this connection."""
        self._cancel_deadline()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser (as uvicorn does), counting the bytes of unfinished headers."""
        if self._refusal is not None:
            return  # lingering after a refusal: drop what the client still sends
        self._idle_since = None  # _unset_keepalive_if_required, inlined: every request
        if self.timeout_keep_alive_task is not None:
            self._unset_keepalive_if_required()
        counting, request = self._in_headers, self._requests
        self._read = len(data)
        if counting:
            self._seen += self._read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:  # our callbacks' refusals included
            if self._refusal is not None:
                self._respond_and_close(*self._refusal)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_headers:
            # A read that began and ended inside one request's headers is all header
            # bytes: this bounds a huge header, which the parser reports only once complete.
            if counting and request == self._requests:
                self._raw += self._read
                if self._raw > self.limits.max_request_header_bytes:
                    self._refuse(431, self._too_large())
                    return
            # Armed after the read, not before: a request that arrives whole in one read
            # costs no timer, and this read brought its first byte.
            if self._deadline is None:
                self._arm_deadline()
        elif (
            request == self._requests  # (a request that began in this read has its cycle)
            and self._deadline is None
            and (self.cycle is None or self.cycle.response_complete)
        ):
            # Bytes that began no request (stray CRLFs) on an idle connection: uvicorn's
            # keep-alive timer was just cancelled, so something must bound the wait.
            self._arm_deadline()

    # --- the keep-alive timeout: one timer per connection ---------------------------------

    def on_response_complete(self) -> None:
        """uvicorn's ``on_response_complete``, with the idle wait started by noting the time
        instead of a timer of its own (see the module docstring)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        # (Not idle before this: the bytes of the request that ended said so.)
        if self.flow.read_paused:  # flow.resume_reading(), without its call when not paused
            self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = now = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_at(now + self.timeout_keep_alive, self._idle_check)

    def _unset_keepalive_if_required(self) -> None:
        """The connection is not idle any more (bytes arrived, or it is lost)."""
        self._idle_since = None
        if self.timeout_keep_alive_task is not None:  # uvicorn's own timer: never armed here
            super()._unset_keepalive_if_required()

    def _idle_check(self) -> None:
        self._idle_timer = None
        since = self._idle_since
        if since is None:
            return  # busy: the end of the next response arms it again
        due = since + self.timeout_keep_alive
        if self.loop.time() < due:
            self._idle_timer = self.loop.call_at(due, self._idle_check)
            return
        self.timeout_keep_alive_handler()

    # --- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A request line begins: its headers are counted from here, and its scope is made
        (uvicorn's ``on_message_begin``, inlined: one Python frame fewer per request)."""
        self._requests += 1
        self._in_headers = True
        self._seen, self._raw = self._read, 0  # this whole read, at most
        self.url = b""
        self.expect_100_continue = False
        headers: list[tuple[bytes, bytes]] = []
        self.headers = headers
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": _SPEC_VERSION},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": headers,
            "state": self.app_state.copy(),
        }

    def on_body(self, body: bytes) -> None:
        """uvicorn's ``on_body``, its cycle looked up once."""
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        """uvicorn's ``on_message_complete``, its cycle looked up once."""
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        cycle.more_body = False
        cycle.message_event.set()

    def on_headers_complete(self) -> None:
        """The headers are in: check them; no deadline while the app works or the body
        arrives. Then uvicorn's ``on_headers_complete``, inlined (one Python frame fewer),
        making a keep-alive request's cycle a :class:`FastCycle` directly (the cheaper
        response head: gateway/commands/response_cycle.py) and giving every request's
        scope the response splice."""
        self._in_headers = False
        if self._deadline is not None:
            self._cancel_deadline()
        limits = self.limits
        headers = self.headers
        if len(headers) > limits.max_request_headers:
            n = limits.max_request_headers
            self._refusal = (431, f"Too many request header fields (more than {n}).")
            raise _Refused
        if self._seen > limits.max_request_header_bytes and self._header_bytes() > (
            limits.max_request_header_bytes
        ):
            self._refusal = (431, self._too_large())
            raise _Refused
        # From here on uvicorn's on_headers_complete (0.55), step for step.
        parser = self.parser
        scope = self.scope
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        url = self.url
        root_path = self.root_path
        parts = _URLS.get(url) if not root_path else None
        if parts is None:
            parts = _url_parts(url, root_path)
        scope["path"], scope["raw_path"], scope["query_string"] = parts
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        else:
            app = self.app
        existing_cycle = self.cycle
        keep_alive = http_version != "1.0" and parser.should_keep_alive()
        cycle: RequestResponseCycle
        if (
            keep_alive
            and self._fast_cycles
            and not self.server_state.default_headers
            and _CLOSE not in headers
        ):
            # (fast_cycle_allowed's test, the cycle's part of it known per connection.)
            cycle = fast_cycle(
                scope,
                self.transport,
                self.flow,
                asyncio.Event(),
                self.expect_100_continue,
                self.on_response_complete,
                self._done,
            )
        else:
            cycle = RequestResponseCycle(
                scope=scope,
                transport=self.transport,
                flow=self.flow,
                logger=self.logger,
                access_logger=self.access_logger,
                access_log=self.access_log,
                default_headers=self.server_state.default_headers,
                message_event=asyncio.Event(),
                expect_100_continue=self.expect_100_continue,
                keep_alive=keep_alive,
                on_response=self.on_response_complete,
            )
        self.cycle = cycle
        # The response splice (gateway/core/splice.py): a stream's body pieces can reach
        # this connection without one ASGI send each. (uvicorn types an extension's value
        # as a dict, as the ASGI spec's own are; ours is an object.)
        scope["extensions"] = {RESPONSE_SPLICE: UvicornSplice(cycle)}  # type: ignore[dict-item]
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(cycle, app)
        else:
            # Pipelined requests wait for the response before them, in order.
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """uvicorn's ``_start_asgi_task``, with the task set's ``discard`` bound once per
        connection rather than once per request; a keep-alive request for ``HTTP_CALL``'s
        call runs without ``run_asgi``'s coroutine (``FastCycle.run_direct``)."""
        if self._reset_contextvars:
            super()._start_asgi_task(cycle, app)
            return
        if app is self._direct and cycle.__class__ is FastCycle:
            cycle.run_direct(app, self.loop, self.tasks)  # type: ignore[arg-type]
            return
        task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self._task_done)
        self.tasks.add(task)

    # --- limits ---------------------------------------------------------------------

    def _too_large(self) -> str:
        limit = self.limits.max_request_header_bytes
        return f"Request line and headers too large (more than {limit} bytes)."

    def _header_bytes(self) -> int:
        # The request line (method and version: about 15 bytes) and each line's ": " CRLF.
        size = len(self.url) + 16
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        return size

    def _arm_deadline(self) -> None:
        self._deadline = self.loop.call_later(
            self.limits.header_read_timeout_seconds, self._header_timeout
        )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_timeout(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._in_headers:
            self._refuse(408, "Request headers not received in time.")
        elif self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # connected (or kept alive) without starting a request
        else:
            self.cycle.keep_alive = False  # a response is in progress: close after it

    def _refuse(self, status: int, message: str) -> None:
        self._refusal = (status, message)
        self._respond_and_close(status, message)

    def _respond_and_close(self, status: int, message: str) -> None:
        self._cancel_deadline()
        cycle = self.cycle  # while headers are read, the previous request's, if any
        if cycle is not None and not cycle.response_complete:
            # A pipelined request over a limit while the previous response is still being
            # written: do not write into the middle of it, close once it is done.
            cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.logger.warning("Refused a request: %s %s", status, message)
        body = message.encode("ascii")
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        if self.transport.can_write_eof():
            # Lingering close: a close with unread input would make the kernel send a
            # reset, which can destroy the response before the client reads it.
            self.transport.write_eof()
            self._linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

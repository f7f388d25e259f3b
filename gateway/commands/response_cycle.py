"""uvicorn's request cycle with a cheaper response head, for ``creditgate serve``.

uvicorn's ``RequestResponseCycle.send`` checks each response header in a Python loop: a
regex search of the name, another of the value, a ``lower()``, three comparisons. A
proxied short answer carries ten headers (the upstream's four, the metering middleware's
six), so that loop was ~600 bytecodes and 20 regex calls per response, the largest single
item of uvicorn's share of a metered request (BENCHMARKS.md section 2b). And the head and
the body went out in two ``transport.write`` calls: two send() system calls per response.

:class:`FastCycle` (the protocol of gateway/commands/limited_protocol.py makes each
keep-alive request's cycle one) sends the same bytes more cheaply:

- every header is still checked, all names with one ``bytes.translate`` and all lines
  with another (C loops over the bytes, no regex), by a rule *stricter* than uvicorn's: a
  name must be a lowercase RFC 9110 token, a value visible ASCII, space or obs-text (no
  control character, not even a tab), and no CR or LF but the ones ending each line;
- ``receive`` takes a request body that is already there without waiting on the cycle's
  event (the same message uvicorn's ``receive`` gives);
- a head whose body has a Content-Length of at most 64 KiB is held until the first body
  message and written with it, in one ``transport.write`` (an app that sends such a head
  and then nothing, which uvicorn answers by closing the connection, leaves the client
  without the head too).

Whatever the fast path does not take goes to uvicorn's own ``send``, unchanged: a header
outside the stricter rule (uvicorn then accepts or refuses it as its version does), a
Connection or Transfer-Encoding header, headers that are not a list or tuple of 2-tuples
of bytes, default headers of uvicorn's own, an access log, a connection that is closing
(uvicorn versions differ there), a client that is slow or gone. So the client receives
exactly the bytes uvicorn's ``send`` would write (tests/commands/test_response_cycle.py
compares them, and runs against the oldest uvicorn ``pyproject.toml`` allows too).

It relies on the cycle's attributes that uvicorn's ``send`` itself uses (``transport``,
``flow``, ``scope``, ``keep_alive``, ``default_headers``, ``access_log``,
``response_started``, ``response_complete``, ``chunked_encoding``,
``expected_content_length``, ``waiting_for_100_continue``, ``message_event``,
``on_response``, ``disconnected``), the same in every uvicorn since 0.30.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn._types import ASGIReceiveEvent, ASGISendEvent, HTTPRequestEvent, HTTPScope
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

__all__ = ["CLOSE", "FastCycle", "fast_cycle", "fast_cycle_allowed"]

# Lowercase RFC 9110 tokens; VCHAR, SP and obs-text: what a name and a value may hold here
# (``bytes.translate`` deletes them, in C: what is left is what is not allowed).
_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_VISIBLE = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_CRLF = b"\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
CLOSE = (b"connection", b"close")
"""A request's ``Connection: close`` header as uvicorn's parser hands it over."""
# Larger bodies are not copied to join them to the head: two writes are cheaper then.
_JOIN_MAX = 65536
# Joined name sequences already found to be lowercase tokens (an app answers with the same
# few): a set lookup instead of a translate per response. Bounded: emptied when full,
# long sequences never kept.
_TOKEN_NAMES: set[bytes] = set()
_new_cycle = object.__new__
_TOKEN_NAMES_MAX = 256
_TOKEN_NAMES_LONG = 4096


def _lowercase_tokens(names: bytes) -> bool:
    """Whether ``names`` (the names of a response's headers, joined) holds nothing but
    lowercase token characters; kept in ``_TOKEN_NAMES`` when it does."""
    if names.translate(None, _TOKEN):
        return False
    if len(names) <= _TOKEN_NAMES_LONG:
        if len(_TOKEN_NAMES) >= _TOKEN_NAMES_MAX:
            _TOKEN_NAMES.clear()
        _TOKEN_NAMES.add(names)
    return True


def fast_cycle_allowed(cycle: RequestResponseCycle, request_headers: list[Any]) -> bool:
    """Whether ``cycle`` may become a :class:`FastCycle`: it keeps the connection open, the
    request did not ask to close it (uvicorn 0.30 answers that request's exact
    ``connection: close`` with a header of its own, later versions with another), and
    there is no access log and no default header of uvicorn's own (both fixed for the
    cycle's life: ``serve`` has neither)."""
    return (
        bool(cycle.keep_alive)
        and CLOSE not in request_headers
        and not cycle.access_log
        and not cycle.default_headers
    )


def fast_cycle(
    scope: HTTPScope,
    transport: asyncio.Transport,
    flow: FlowControl,
    message_event: asyncio.Event,
    expect_100_continue: bool,
    on_response: Callable[..., None],
    done: asyncio.Future[None],
) -> FastCycle:
    """A new keep-alive request's :class:`FastCycle`, as uvicorn's ``RequestResponseCycle``
    would make it with ``keep_alive=True``, no access log and no default headers (what
    :func:`fast_cycle_allowed` asks), sending through ``transport``; ``done``: a future
    done already, for ``send`` to return. Only what differs per request is set on the
    instance: the rest are the class's defaults (no ``__init__`` frame of eleven keyword
    arguments per request)."""
    cycle = _new_cycle(FastCycle)
    cycle.scope = scope
    cycle.transport = transport
    cycle.flow = flow
    cycle.message_event = message_event
    cycle.on_response = on_response
    cycle.waiting_for_100_continue = expect_100_continue
    cycle.body = bytearray()
    cycle.done = done
    return cycle


_COROUTINE = types.CoroutineType


def _nothing() -> None:
    """A finished cycle's ``on_response`` (as run_asgi's ``lambda: None``)."""


async def _raising(exc: BaseException) -> None:
    """The request's coroutine when calling the app raised: it raises that."""
    raise exc


async def _awaiting(awaitable: Awaitable[Any]) -> Any:
    """The request's coroutine when the app gave another awaitable than a coroutine."""
    return await awaitable


class FastCycle(RequestResponseCycle):
    """A ``RequestResponseCycle`` whose ``send`` takes the common response the cheap way
    (see the module docstring); anything else is uvicorn's own ``send``."""

    # The head waiting for its Content-Length body (a class default: uvicorn's __init__
    # knows nothing of it, and a cycle becomes a FastCycle after it was made).
    _held: bytes | None = None
    # What send returns when it did its work at once: a future done already (awaiting it
    # returns at once). The protocol gives each cycle its connection's; else made once.
    done: asyncio.Future[None] | None = None

    # What every FastCycle that ``fast_cycle`` makes starts with, as class defaults (a
    # cycle made by uvicorn's __init__ sets them all on the instance, shadowing these):
    # uvicorn's loggers, no access log or default headers (fast_cycle_allowed), and the
    # state of a request just begun.
    logger = logging.getLogger("uvicorn.error")
    access_logger = logging.getLogger("uvicorn.access")
    access_log = False
    default_headers: list[tuple[bytes, bytes]] = []  # never mutated: send copies it
    disconnected = False
    keep_alive = True
    more_body = True
    response_started = False
    response_complete = False
    chunked_encoding: bool | None = None
    expected_content_length = 0
    # The server's task set, when run_direct runs the request (its task leaves it at the end).
    tasks: set[Any] | None = None

    def send(self, message: ASGISendEvent) -> Awaitable[None]:  # type: ignore[override]
        """Send one ASGI message: the fast path, or uvicorn's ``send``.

        A plain method returning the awaitable, not a coroutine: what the fast path writes
        is written by the call, and the awaitable is a future done already (no coroutine
        object and frame per message); anything else returns uvicorn's ``send(message)``.
        Await it at once, as ASGI apps do (``await send(message)``)."""
        msg: dict[str, Any] = message  # type: ignore[assignment]
        held = self._held
        if held is not None:
            self._held = None
            if (
                msg["type"] == "http.response.body"
                and not msg.get("more_body", False)
                and not self.flow.write_paused
                and not self.disconnected
                and self.keep_alive
            ):
                # The usual short answer: its whole body after its held head, in one
                # write (_send_held's first case, inlined: one Python frame fewer).
                body = msg.get("body", b"")
                if len(body) == self.expected_content_length:
                    self.expected_content_length = 0
                    self.transport.write(held + body)
                    self.response_complete = True
                    self.message_event.set()
                    self.on_response()
                    return self.done or self._done()
            rest = self._send_held(held, msg)
            return rest if rest is not None else self.done or self._done()
        if (
            self.response_started
            or msg["type"] != "http.response.start"
            or self.flow.write_paused
            or self.disconnected
            or not self.keep_alive
        ):
            return super().send(message)
        headers = msg.get("headers", ())
        status = msg["status"]
        if type(headers) not in (list, tuple) or status not in STATUS_LINE:
            return super().send(message)
        try:
            # Each header a pair (dict() says so), of bytes (join() says so); the lines
            # made without a format per header.
            fields = dict(headers)
            names = b"".join(fields)
            block = b"\r\n".join(map(b": ".join, headers))
        except (TypeError, ValueError):  # uvicorn's send says what is wrong
            return super().send(message)
        count = len(headers)
        if (
            # Every name a lowercase token (a repeated name is the same bytes: its first
            # spelling in the dict checks it; the names joined: a token's characters make
            # tokens however they are split), and nothing but visible characters, spaces
            # and the CRLFs between the lines in the block: no control character, no CR or
            # LF in a name or value.
            (names not in _TOKEN_NAMES and not _lowercase_tokens(names))
            or block.translate(None, _VISIBLE) != _CRLF * (count - 1)
            or b"transfer-encoding" in fields
            or b"connection" in fields
            or (count != len(fields) and b"content-length" in fields)  # which one counts?
        ):
            return super().send(message)
        self.response_started = True
        self.waiting_for_100_continue = False
        status_line = STATUS_LINE[status]
        if count:
            status_line += block + _CRLF
        if b"content-length" in fields:
            self.expected_content_length = int(fields[b"content-length"].decode())
            self.chunked_encoding = False
            head = status_line + _CRLF
            if 0 < self.expected_content_length <= _JOIN_MAX and self.scope["method"] != "HEAD":
                self._held = head  # written with the body's first bytes
                return self.done or self._done()
        elif self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            head = status_line + _CHUNKED
        else:
            head = status_line + _CRLF
        self.transport.write(head)
        return self._done()

    def run_direct(
        self, app: Callable[..., Any], loop: asyncio.AbstractEventLoop, tasks: set[Any]
    ) -> None:
        """Run ``app`` for this request in a task of its own whose coroutine is the app's
        own, not uvicorn's ``run_asgi`` around it: every resume of the request's task (the
        charge's reply, the upstream's answer) goes through one coroutine level fewer.
        What ``run_asgi`` does after the app (a failure logged and answered with 500 or a
        close, an app that returned without a whole response) is done by the task's end,
        :meth:`_ended`, the same way. ``app`` is called here, not in the task: it must be
        a plain picker of the endpoint (``HTTP_CALL``) or a coroutine function."""
        try:
            call = app(self.scope, self.receive, self.send)
        except BaseException as exc:  # as run_asgi catches it
            call = _raising(exc)
        if type(call) is not _COROUTINE:
            call = _awaiting(call)
        task = loop.create_task(call)
        self.tasks = tasks
        task.add_done_callback(self._ended)
        tasks.add(task)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        """The request's task ended (see :meth:`run_direct`): out of the server's task set,
        and anything but the usual end (None returned, the response complete) handled as
        uvicorn's ``run_asgi`` handles it, in a task of its own (it may send a 500)."""
        tasks = self.tasks
        if tasks is not None:
            tasks.discard(task)
        # (run_asgi catches the app's cancellation too)
        failure = asyncio.CancelledError() if task.cancelled() else task.exception()
        result = None
        if failure is None:
            result = task.result()
            if result is None and self.response_complete:
                self.on_response = _nothing  # run_asgi's finally
                return
        end = task.get_loop().create_task(self._end(failure, result))
        if tasks is not None:
            end.add_done_callback(tasks.discard)
            tasks.add(end)

    async def _end(self, failure: BaseException | None, result: Any) -> None:
        """The rest of uvicorn's ``run_asgi`` (the same in 0.30 and 0.55), after the app."""
        try:
            if failure is not None:
                self.logger.error("Exception in ASGI application\n", exc_info=failure)
                if not self.response_started:
                    await self.send_500_response()
                else:
                    self.transport.close()
            elif result is not None:
                msg = "ASGI callable should return None, but returned '%s'."
                self.logger.error(msg, result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = _nothing

    def _done(self) -> asyncio.Future[None]:
        """The future done already that :meth:`send` returns when its work is done."""
        done = self.done
        if done is None:
            done = self.done = asyncio.get_running_loop().create_future()
            done.set_result(None)
        return done

    async def receive(self) -> ASGIReceiveEvent:
        """uvicorn's ``receive``; what the request sent so far taken at once when it is
        there already (the usual short request: its body came in the read that began it),
        without the event's wait coroutine. The same message and state as uvicorn's."""
        event = self.message_event
        if (
            self.waiting_for_100_continue
            or self.disconnected
            or self.response_complete
            or not event.is_set()
        ):
            return await super().receive()
        flow = self.flow
        if flow.read_paused:  # flow.resume_reading(), without its call when not paused
            flow.resume_reading()
        event.clear()
        message: HTTPRequestEvent = {
            "type": "http.request",
            "body": bytes(self.body),
            "more_body": self.more_body,
        }
        self.body = bytearray()
        return message

    def _send_held(self, head: bytes, msg: dict[str, Any]) -> Awaitable[None] | None:
        """The message after a held head: a body that fits goes out with it in one write
        (None: done); anything else gets the head written first, then uvicorn's ``send``
        (its awaitable returned, for the caller to await at once)."""
        if (
            msg["type"] != "http.response.body"
            or self.flow.write_paused
            or self.disconnected
            or not self.keep_alive
        ):
            if not self.disconnected:  # uvicorn drops what is sent to a gone client
                self.transport.write(head)
            return super().send(msg)  # type: ignore[arg-type]
        body = msg.get("body", b"")
        size = len(body)
        if size > self.expected_content_length or size > _JOIN_MAX:
            self.transport.write(head)
            return super().send(msg)  # type: ignore[arg-type]  # which raises if too long
        self.expected_content_length -= size
        self.transport.write(head + body)
        if not msg.get("more_body", False):
            # As uvicorn's send ends a response.
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            self.on_response()
        return None

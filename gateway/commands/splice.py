"""The response splice (gateway/core/splice.py) over uvicorn's httptools protocol.

``creditgate serve``'s protocol (gateway/commands/limited_protocol.py) gives each request
one :class:`UvicornSplice` over its ``RequestResponseCycle``. A piece is written the way
the cycle's own ``send`` writes a ``http.response.body`` message with ``more_body=True``
under chunked framing (``<hex length>\\r\\n<bytes>\\r\\n``, one ``transport.write``), so
a spliced stream is byte for byte what the ASGI path sends; the start and the final chunk
still go through ``send``, which keeps the cycle's state (started, complete, keep-alive)
its own. Flow control is uvicorn's: the protocol's ``pause_writing`` sets
``flow.write_paused`` inside ``transport.write`` when the client's buffer passes its high
water mark, and ``flow.drain()`` waits for ``resume_writing`` (which a lost connection
also calls).

The splice holds its cycle by a weak reference: the cycle holds the request's scope, whose
extensions hold the splice, so a strong one would make every request a reference cycle,
freed only by the cycle collector (whose passes cost a proxied short request ~30k
instructions: BENCHMARKS.md section 2c). The cycle lives as long as the request's task,
which is all the time anything uses the splice; once it is gone the splice is never ready
and drops what it is handed.

It relies on uvicorn internals that uvicorn's ``send`` itself uses (the cycle's
``transport``, ``flow``, ``disconnected``, ``response_started``, ``response_complete``,
``chunked_encoding``); tests/proxy/test_splice.py checks the bytes against ``send``'s.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.core.splice import BodyObserver

__all__ = ["UvicornSplice"]


class UvicornSplice(weakref.ref[RequestResponseCycle]):
    """A :class:`gateway.core.splice.ResponseSplice` for one uvicorn request cycle:
    ``UvicornSplice(cycle)``.

    It *is* the weak reference to its cycle (see the module docstring: no reference
    cycle), a subclass of ``weakref.ref`` with no ``__init__`` of its own: every request
    gets one, made in C, with no Python frame run. Compared and hashed by identity, as any
    object (not by its cycle, as a plain weak reference is)."""

    # The observer set by observe(): none until then (a class default, so that making one
    # sets nothing; the instance's own __dict__ appears only when an observer is set).
    _observer: BodyObserver | None = None

    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__

    def is_server_send(self, send: Callable[..., Awaitable[None]]) -> bool:
        """Whether ``send`` is this cycle's ``send`` (a bound method: equal, not identical)."""
        cycle = self()
        return cycle is not None and send == cycle.send

    def ready(self) -> bool:
        """Started with chunked framing, not complete, the client still there, not HEAD."""
        cycle = self()
        return bool(
            cycle is not None
            and cycle.response_started
            and cycle.chunked_encoding
            and not cycle.response_complete
            and not cycle.disconnected
            and cycle.scope["method"] != "HEAD"
        )

    def write(self, data: bytes) -> bool:
        """One chunk, as ``send`` frames it; False once the client's buffer is full. The
        observer, if any, sees it first, also when the client is gone (a drained stream's
        usage must still be read)."""
        observer = self._observer
        if observer is not None:
            observer(data)
        cycle = self()
        if cycle is None or cycle.disconnected:
            return True  # dropped, as send drops it; the app hears of it from receive()
        cycle.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return not cycle.flow.write_paused

    def observe(self, observer: BodyObserver) -> None:
        """Every piece written from now on goes to ``observer`` first."""
        self._observer = observer

    async def drain(self) -> None:
        """Until the client's buffer is below its low water mark, or the client is gone."""
        cycle = self()
        if cycle is not None and cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()

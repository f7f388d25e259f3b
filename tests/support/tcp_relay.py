"""``TcpRelay``: a TCP relay in the test's event loop that can hold back what a client sends.

Put between a gateway process and Redis, it makes "the gateway wrote its settle but Redis
never got it" a reliable state rather than a race: after :meth:`TcpRelay.hold`, every byte
the client sends is kept in :attr:`TcpRelay.held` instead of being forwarded (replies still
flow back), and :meth:`TcpRelay.close` drops the held bytes with the connections, as a
network partition followed by the client's death would::

    relay = TcpRelay("127.0.0.1", 6379)
    port = await relay.start()        # point the client at 127.0.0.1:port
    relay.hold()                      # from now on nothing reaches the server
    await relay.wait_held(b"...")     # the client has written these bytes
    await relay.close()               # ... and they are gone
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class TcpRelay:
    """Relays each accepted connection to ``host:port``; see the module docstring."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.held = bytearray()
        self._holding = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on a free 127.0.0.1 port; return it."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def hold(self) -> None:
        """Stop forwarding what clients send (it accumulates in :attr:`held`)."""
        self._holding = True

    async def wait_held(self, needle: bytes, within: float = 10.0) -> None:
        """Wait until ``needle`` is among the held bytes (AssertionError after ``within`` s)."""
        deadline = time.monotonic() + within
        while needle not in self.held:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} never sent; held {bytes(self.held)[:200]!r}")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        """Stop listening and drop every connection, and the held bytes with them."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        self._writers += [client_w, server_w]
        for task in (
            asyncio.create_task(self._pump(client_r, server_w, from_client=True)),
            asyncio.create_task(self._pump(server_r, client_w, from_client=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_client: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if from_client and self._holding:
                    self.held += data
                    continue
                writer.write(data)
                await writer.drain()
        # One side closed (or died): close the other, so a dead client's connection to the
        # server goes away without the held bytes ever being sent.
        writer.close()

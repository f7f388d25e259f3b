"""``served(app, config)``: an ASGI app under uvicorn as ``creditgate serve`` runs it.

The app is served on a free 127.0.0.1 port in a background thread with the server options
of gateway.commands.server (the ``server:`` limits) and without uvicorn's own proxy-header
handling (``serve`` turns it off: the client address is creditgate's business). Yields the
port; stops the server on exit, even when the test fails.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from gateway.commands.server import server_options
from gateway.config import Config


@contextmanager
def served(app: Any, config: Config) -> Iterator[int]:
    """Serve ``app`` with ``config``'s server options; yield the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # binding here (not by port number) avoids a port race
    server = uvicorn.Server(
        uvicorn.Config(
            app, lifespan="on", log_level="warning", access_log=False, proxy_headers=False,
            timeout_graceful_shutdown=1, **server_options(config),
        )
    )  # fmt: skip
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

"""A real webhook receiver for the alert tests: verifies each delivery's signature with the
``standardwebhooks`` library and appends what it saw, one JSON line per request.

In-process (``Receiver``, an aiohttp server on a port) or as its own process::

    python -m tests.support.webhook_receiver PORT SECRET LOG [FAIL_FIRST]

It answers 500 to the first ``FAIL_FIRST`` verified deliveries (the sender must retry,
keeping the webhook-id), 401 to a bad signature, else 204.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook


def app(secret: str, log: Path, fail_first: int = 0) -> web.Application:
    """The receiver's aiohttp app."""
    verifier = Webhook(secret)
    state = {"verified": 0}

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        record: dict[str, Any] = {"id": request.headers.get("webhook-id")}
        try:
            record["payload"] = verifier.verify(body, dict(request.headers))
            record["verified"] = True
        except Exception as exc:  # any verification failure is the test's finding
            record["verified"], record["error"] = False, str(exc)
        status = 401
        if record["verified"]:
            state["verified"] += 1
            status = 500 if state["verified"] <= fail_first else 204
        record["answered"] = status
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return web.Response(status=status)

    application = web.Application()
    application.router.add_post("/hook", receive)
    return application


def received(log: Path) -> list[dict[str, Any]]:
    """Every request the receiver logged, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


class Receiver:
    """The receiver in this event loop, on ``port``."""

    def __init__(self, port: int, secret: str, log: Path, fail_first: int = 0) -> None:
        self.port, self.log = port, log
        self._runner = web.AppRunner(app(secret, log, fail_first))

    @property
    def url(self) -> str:
        """Where to send."""
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        """Listen."""
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop listening (the port refuses connections again)."""
        await self._runner.cleanup()

    def received(self) -> list[dict[str, Any]]:
        """Every request logged so far."""
        return received(self.log)


async def _serve(port: int, secret: str, log: Path, fail_first: int) -> None:
    receiver = Receiver(port, secret, log, fail_first)
    await receiver.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, secret, log = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    asyncio.run(_serve(port, secret, log, int(sys.argv[4]) if len(sys.argv) > 4 else 0))

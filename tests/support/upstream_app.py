"""A real Starlette upstream for proxy tests, and a helper to serve any ASGI app over TCP.

Endpoints (all under the app root):
- ``/echo/{path}`` (any method): JSON with method, path, raw_path, query_string, headers
  (list of [name, value]) and body (latin-1 text), body_len.
- ``/sse?n=3&delay=0.01&gate=NAME``: ``text/event-stream`` of n events ``data: i``; with a
  gate, waits after the first event until ``POST /control/release/NAME``.
- ``/big?size=N&chunk=M``: N bytes of a fixed pattern, streamed in M-byte chunks (chunked,
  no Content-Length).
- ``/upload/{id}`` (POST/PUT): consumes the request body as a stream, publishing progress at
  ``GET /control/progress/{id}``; answers JSON len, sha256, chunks.
- ``/status/{code}``: answers that status with a small JSON body.
- ``/slow?delay=S``: sleeps before answering; ``/stall?delay=S``: sends headers and one
  chunk, then sleeps between chunks.
- ``/abort?mode=chunked|big|small``: sends headers and part of the body, then drops the
  connection.
- ``/redirect`` (302), ``/gzip`` (a gzip-encoded body), ``/headers`` (hop-by-hop and
  repeated response headers).
Stream endpoints record how they ended at ``GET /control/progress/{gate-or-id}``
(``finished`` / ``cancelled``).

``serve_in_thread(app)`` runs an app with uvicorn on a free 127.0.0.1 port in a background
thread and yields its base URL; it stops the server on exit, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PATTERN = bytes(range(256)) * 256  # 64 KiB, repeated to build large bodies

# Per-process control state; the upstream runs on one event loop (its server thread).
_gates: dict[str, asyncio.Event] = {}
_progress: dict[str, dict[str, Any]] = {}


def pattern_bytes(size: int) -> bytes:
    """The first ``size`` bytes of the body ``/big`` produces."""
    reps = size // len(PATTERN) + 1
    return (PATTERN * reps)[:size]


def _gate(name: str) -> asyncio.Event:
    return _gates.setdefault(name, asyncio.Event())


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "raw_path": request.scope["raw_path"].decode("latin-1"),
            "query_string": request.scope["query_string"].decode("latin-1"),
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]
            ],
            "body": body.decode("latin-1"),
            "body_len": len(body),
        },
        headers={"x-upstream": "echo"},
    )


async def sse(request: Request) -> StreamingResponse:
    n = int(request.query_params.get("n", "3"))
    delay = float(request.query_params.get("delay", "0.01"))
    gate = request.query_params.get("gate")
    record = _progress.setdefault(gate or "sse", {})

    async def events() -> AsyncIterator[bytes]:
        try:
            for i in range(n):
                if i == 1 and gate is not None:
                    await _gate(gate).wait()
                elif i:
                    await asyncio.sleep(delay)
                yield f"id: {i}\ndata: {i}\n\n".encode()
            record["finished"] = True
        except asyncio.CancelledError:
            record["cancelled"] = True
            raise

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


async def big(request: Request) -> StreamingResponse:
    size = int(request.query_params.get("size", str(1 << 20)))
    chunk = int(request.query_params.get("chunk", "65536"))
    data = pattern_bytes(size)

    async def body() -> AsyncIterator[bytes]:
        for offset in range(0, size, chunk):
            yield data[offset : offset + chunk]
            await asyncio.sleep(0)

    return StreamingResponse(body(), media_type="application/octet-stream")


async def upload(request: Request) -> JSONResponse:
    record = _progress.setdefault(request.path_params["id"], {})
    record.update(received=0, chunks=0)
    digest = hashlib.sha256()
    async for chunk in request.stream():
        digest.update(chunk)
        record["received"] += len(chunk)
        record["chunks"] += 1 if chunk else 0
    record["finished"] = True
    return JSONResponse(
        {
            "len": record["received"],
            "sha256": digest.hexdigest(),
            "chunks": record["chunks"],
            "transfer_encoding": request.headers.get("transfer-encoding"),
            "content_length": request.headers.get("content-length"),
        }
    )


async def status(request: Request) -> Response:
    code = int(request.path_params["code"])
    if code in (204, 304):
        return Response(status_code=code)
    return JSONResponse({"status": code}, status_code=code)


async def slow(request: Request) -> JSONResponse:
    await asyncio.sleep(float(request.query_params.get("delay", "2")))
    return JSONResponse({"slow": True})


async def stall(request: Request) -> StreamingResponse:
    delay = float(request.query_params.get("delay", "2"))

    async def body() -> AsyncIterator[bytes]:
        yield b"first;"
        await asyncio.sleep(delay)
        yield b"late;"

    return StreamingResponse(body(), media_type="text/plain")


class Abort:
    """Raw ASGI: start a response, send part of it, then fail so uvicorn drops the socket.

    ``?mode=chunked`` (no length), ``big`` (Content-Length 100000) or ``small`` (1000).
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        mode = scope["query_string"].decode().partition("mode=")[2] or "chunked"
        headers = [(b"content-type", b"text/plain")]
        if mode != "chunked":
            headers.append((b"content-length", b"100000" if mode == "big" else b"1000"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"partial" * 10, "more_body": True})
        await asyncio.sleep(0.05)
        raise ConnectionAbortedError("upstream_app: deliberate abort mid-body")


async def redirect(request: Request) -> Response:
    return Response(status_code=302, headers={"location": "/echo/redirected"})


async def gzipped(request: Request) -> Response:
    return Response(
        gzip.compress(b"hello " * 100),
        media_type="text/plain",
        headers={"content-encoding": "gzip"},
    )


async def headers(request: Request) -> Response:
    response = Response(b"ok", media_type="text/plain")
    response.headers.append("set-cookie", "a=1; Path=/")
    response.headers.append("set-cookie", "b=2; Path=/")
    response.headers["keep-alive"] = "timeout=5"
    response.headers["x-hop"] = "1"
    response.headers["connection"] = "x-hop"
    response.headers["x-kept"] = "yes"
    return response


async def release(request: Request) -> JSONResponse:
    _gate(request.path_params["name"]).set()
    return JSONResponse({"released": True})


async def progress(request: Request) -> JSONResponse:
    return JSONResponse(_progress.get(request.path_params["name"], {}))


ANY = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
app = Starlette(
    routes=[
        Route("/echo/{path:path}", echo, methods=ANY),
        Route("/echo", echo, methods=ANY),
        Route("/sse", sse),
        Route("/big", big),
        Route("/upload/{id}", upload, methods=["POST", "PUT"]),
        Route("/status/{code:int}", status, methods=ANY),
        Route("/slow", slow, methods=ANY),
        Route("/stall", stall),
        Route("/abort", Abort()),
        Route("/redirect", redirect),
        Route("/gzip", gzipped),
        Route("/headers", headers),
        Route("/control/release/{name}", release, methods=["POST"]),
        Route("/control/progress/{name}", progress),
    ]
)


@contextlib.contextmanager
def serve_in_thread(asgi_app: Any, *, log_level: str = "warning") -> Iterator[str]:
    """Serve ``asgi_app`` with uvicorn on a free 127.0.0.1 port; yield ``http://host:port``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # binding here (not by port number) avoids a port race
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        asgi_app,
        log_level=log_level,
        lifespan="auto",
        timeout_graceful_shutdown=1,
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

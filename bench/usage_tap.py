"""What charging by usage costs in CPU (DESIGN A8; issue 8's performance targets).

    .venv/bin/python bench/usage_tap.py [--seconds 3] [--requests 10000] [--streams 200]
                                        [--rounds 7] [--event-gap 0.005] [--parts ...]
                                        [--tree DIR] [--json FILE]

Everything in one run, the variants of each part measured round by round (alternating),
best round kept, so the ratios compare like with like. A private Redis, the upstream
process and wrk run on core 1; what is measured runs on core 0.

1. Non-streaming: an OpenAI ``chat.completion`` answer (the same ~900-byte JSON every
   time) to a fixed-cost route, a usage-cost route with a numeric reserve (the answer held
   until read, its usage read and priced) and one with ``reserve: auto`` (the request
   body read and its hold estimated too):
   - proxy server: ``GatewayApp`` (middleware + ``UpstreamProxy``) under uvicorn in its
     own process, in front of the upstream process, loaded by wrk: the server's CPU µs per
     request. Target: usage at most +10%.
   - middleware server: a Starlette app answering the JSON itself behind
     ``CreditGateMiddleware``, under uvicorn, loaded by wrk: the server's CPU µs per request.
   - in process, as bench/middleware_cpu.py measures (the app called as ASGI, no HTTP
     server): the middleware's and the app's CPU only. Here the standard library's JSON
     decode of the answer (~7 µs for 900 bytes) weighs most.
   With ``--parts bodies`` (issue 8's comparison), the same three ways (``bodies-proxy``,
   ``bodies-middleware``, ``bodies-inprocess``) for realistic answers of each provider, a
   fixed-cost feature against a ``usage: auto`` one on the same body: an OpenAI chat
   completion pretty-printed as the API sends it (~2 KB) and a long one (~30 KB), an
   Anthropic message (~1.5 KB, compact) and a Gemini ``generateContent`` answer (~2 KB,
   pretty-printed). ``--tree DIR`` measures another checkout's ``gateway`` (e.g. the tree
   before a change, from ``git archive``) with this script; ``--json FILE`` appends the
   results as one JSON line. ``--parts breakdown``: in process, the 2 KB answer with parts
   of the usage path taken away (a header cost; the usage read and the price stubbed).
2. Streaming, through the proxy (``GatewayApp`` called in process) to the upstream process
   streaming 200 OpenAI chunk events (the last with the usage), one write every
   ``--event-gap`` seconds (5 ms: a fast model), so that events arrive one at a time as
   they do from a model: CPU µs per stream with the usage tap off (a fixed cost), on (a
   usage cost; the relay then drains on a disconnect), and on without draining
   (``usage_drain_seconds: 0``: the tap alone, on today's relay). Target: within 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if "--tree" in sys.argv:  # another checkout's gateway, measured by this script
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()))

from bench.services import (
    WRK,
    cpu_seconds,
    free_port,
    own_redis,
    stop_process,
    wait_listening,
)

CHAT_REQUEST = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant for a sales team."},
            {"role": "user", "content": "Summarise the quarter's pipeline in three bullets."},
        ],
        "max_tokens": 300,
    }
).encode()
CHAT_RESPONSE = json.dumps(
    {
        "id": "chatcmpl-bench000001",
        "object": "chat.completion",
        "created": 1_760_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "- Pipeline grew 12%.\n- Two large deals slipped.\n- Win rate 31%.",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 41,
            "completion_tokens": 22,
            "total_tokens": 63,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
    }
).encode()
EVENTS = 200
ROUTES = {"fixed": "chat_fixed", "usage": "chat_usage", "auto": "chat_auto"}


def _prose(size: int) -> str:
    """Model-like text of about ``size`` characters: sentences, newlines, some quotes."""
    sentence = (
        'The pipeline grew 12% quarter on quarter, led by "enterprise" renewals; two large '
        "deals slipped to Q3 and the win rate held at 31%.\n"
    )
    words = [f"- Item {i}: " + sentence for i in range(size // len(sentence) + 1)]
    return "".join(words)[:size]


def _openai(content: str) -> bytes:
    # OpenAI sends its answers pretty-printed, two spaces per level.
    doc = json.loads(CHAT_RESPONSE)
    doc["choices"][0]["message"]["content"] = content
    return json.dumps(doc, indent=2).encode()


BODIES: dict[str, bytes] = {
    "openai2k": _openai(_prose(1200)),
    "openai30k": _openai(_prose(29000)),
    "anthropic": json.dumps(
        {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": _prose(1100)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 412,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                "output_tokens": 287,
                "service_tier": "standard",
            },
        },
        separators=(",", ":"),
    ).encode(),
    "gemini": json.dumps(
        {
            "candidates": [
                {
                    "content": {"parts": [{"text": _prose(1200)}], "role": "model"},
                    "finishReason": "STOP",
                    "avgLogprobs": -0.21,
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": 412,
                "candidatesTokenCount": 287,
                "totalTokenCount": 950,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 412}],
                "thoughtsTokenCount": 251,
            },
            "modelVersion": "gemini-2.5-flash",
            "responseId": "bench-gemini-0001",
        },
        indent=2,
    ).encode(),
}
"""Realistic answers of each provider, by name (``--parts bodies``)."""
BODY_ROUTES = {"fixed": "fixed", "usage": "any"}
"""Per variant of the bodies comparison, the path prefix: a fixed cost, or ``usage: auto``."""


def body_of(path: str) -> bytes:
    """The answer for ``path``: ``/<prefix>/<body>/v1/...`` names one of BODIES."""
    parts = path.split("/")
    return BODIES[parts[2]] if len(parts) > 2 and parts[2] in BODIES else CHAT_RESPONSE


CONFIG = """\
redis_url: {redis_url}
database_url: ""
upstream: {upstream}
key_prefix: {prefix}
identity: {{trusted_headers: true}}
models:
  "gpt-4o-mini*": {{input: 1, cached_input: 0.5, output: 4}}
  default: {{input: 2, output: 8}}
features:
  chat_fixed: {{cost: 1}}
  chat_usage: {{cost: {{usage: openai, reserve: 5, max: 1000}}}}
  chat_auto:  {{cost: {{usage: openai, reserve: auto, max: 1000}}}}
  chat_any:   {{cost: {{usage: auto, reserve: 5, max: 100000}}}}
  chat_hdr:   {{cost: {{header: X-Cost, reserve: 5, max: 100000}}}}
  chat_anth:  {{cost: {{usage: anthropic, reserve: 5, max: 100000}}}}
plans:
  bench:
    allocations:
      {{chat_fixed: 1000000000, chat_usage: 1000000000, chat_auto: 1000000000,
       chat_any: 1000000000, chat_hdr: 1000000000, chat_anth: 1000000000}}
default_plan: bench
routes:
  - {{method: POST, path: /fixed/v1/chat/completions, feature: chat_fixed}}
  - {{method: POST, path: /usage/v1/chat/completions, feature: chat_usage}}
  - {{method: POST, path: /auto/v1/chat/completions, feature: chat_auto}}
  - {{method: POST, path: "/fixed/{{body}}/v1/chat/completions", feature: chat_fixed}}
  - {{method: POST, path: "/any/{{body}}/v1/chat/completions", feature: chat_any}}
  - {{method: POST, path: "/hdr/{{body}}/v1/chat/completions", feature: chat_hdr}}
  - {{method: POST, path: "/anth/{{body}}/v1/chat/completions", feature: chat_anth}}
"""


# -- the upstream process (``--serve-upstream PORT``) ------------------------------------------
def sse_events() -> list[bytes]:
    """200 chat.completion.chunk events, the last with the usage, then [DONE]."""
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_760_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_bench",
        "usage": None,
    }
    out = []
    for i in range(EVENTS - 2):
        delta = {"index": 0, "delta": {"content": f"tok{i} "}, "logprobs": None}
        out.append(chunk | {"choices": [delta | {"finish_reason": None}]})
    out.append(chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    usage = {"prompt_tokens": 41, "completion_tokens": EVENTS - 2, "total_tokens": 239}
    out.append(chunk | {"choices": [], "usage": usage})
    return [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in out] + [
        b"data: [DONE]\n\n"
    ]


def serve_upstream(port: int, gap: float) -> None:
    import uvicorn

    events = sse_events()
    headers = [(b"content-type", b"text/event-stream; charset=utf-8")]

    json_type = (b"content-type", b"application/json")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if b'"stream":true' not in body.replace(b" ", b""):
            answer = body_of(scope["path"])
            json_headers = [json_type, (b"content-length", str(len(answer)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": answer})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await asyncio.sleep(gap)  # paced like a model: one event per write
        await send({"type": "http.response.body", "body": b""})

    # Idle connections kept for long: under valgrind (bench/usage_instructions.py) on a loaded
    # machine the gateway may leave its pooled connection idle past uvicorn's default 5 s,
    # and a connection closed as it is reused is a 502 that fails the run.
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
        timeout_keep_alive=600,
    )  # fmt: skip


def chat_app(config_path: Path) -> Any:
    """The Starlette app answering CHAT_RESPONSE on every route, behind the middleware."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from gateway.config import load_config
    from gateway.metering.gate import CreditGate
    from gateway.metering.middleware import CreditGateMiddleware

    async def chat(request: Request) -> Response:
        return Response(CHAT_RESPONSE, media_type="application/json")

    async def answer(request: Request) -> Response:
        return Response(BODIES[request.path_params["body"]], media_type="application/json")

    # One route for every kind: the router costs the same for each.
    app = Starlette(
        routes=[
            Route("/{kind}/v1/chat/completions", chat, methods=["POST"]),
            Route("/{kind}/{body}/v1/chat/completions", answer, methods=["POST"]),
        ]
    )
    app.add_middleware(CreditGateMiddleware, gate=CreditGate(load_config(config_path)))
    return app


def serve_app(config_path: Path, port: int, kind: str) -> None:
    import uvicorn

    if kind == "proxy":
        from gateway.commands.server import GatewayApp
        from gateway.config import load_config
        from gateway.metering.gate import CreditGate

        app: Any = GatewayApp(CreditGate(load_config(config_path)), sync=False)
    else:
        app = chat_app(config_path)
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning",
        access_log=False, loop="uvloop", http="httptools", lifespan="off",
    )  # fmt: skip


def wrk_lua(path: Path) -> Path:
    body = CHAT_REQUEST.decode().replace("\\", "\\\\").replace("'", "\\'")
    path.write_text(
        f"wrk.method = \"POST\"\nwrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["X-Org-Id"] = "bench-org"\nwrk.headers["X-User-Id"] = "u1"\n'
    )
    return path


def route_paths() -> dict[str, str]:
    """The non-streaming variants: result key -> path."""
    return {kind: f"/{kind}/v1/chat/completions" for kind in ROUTES}


def body_paths(body: str) -> dict[str, str]:
    """The bodies comparison for one answer: result key -> path."""
    return {kind: f"/{prefix}/{body}/v1/chat/completions" for kind, prefix in BODY_ROUTES.items()}


def server_part(
    config_path: Path, args: argparse.Namespace, kind: str, targets: dict[str, str]
) -> dict[str, list[float]]:
    """Server CPU µs per request under wrk, per target (result key -> path), every round
    alternating the targets; ``kind``: ``proxy`` (GatewayApp) or ``middleware`` (the
    Starlette app)."""
    port = free_port()
    tree = ["--tree", str(args.tree)] if args.tree else []
    server = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, __file__, "--serve-app", str(config_path),
         "--port", str(port), "--app-kind", kind, *tree],
        start_new_session=True,
    )  # fmt: skip
    script = wrk_lua(config_path.parent / "chat.lua")
    results: dict[str, list[float]] = {k: [] for k in targets}
    try:
        wait_listening(port, server)

        def one(route: str, seconds: float) -> float:
            url = f"http://127.0.0.1:{port}{targets[route]}"
            cpu = cpu_seconds(server.pid)
            done = subprocess.run(
                ["taskset", "-c", "1", WRK, "-t1", f"-c{args.connections}",
                 f"-d{seconds:g}s", "-s", str(script), url],
                check=True, capture_output=True, text=True, timeout=seconds + 30,
            )  # fmt: skip
            used = cpu_seconds(server.pid) - cpu
            requests = int(done.stdout.split(" requests in ")[0].split()[-1])
            if "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
                raise RuntimeError(f"wrk saw failures against {url}:\n{done.stdout}")
            return used / requests * 1e6

        for route in targets:
            one(route, 1)  # warm up
        for _ in range(args.rounds):
            for route in targets:
                results[route].append(one(route, args.seconds))
    finally:
        stop_process(server)
    return results


# -- the measured process ---------------------------------------------------------------------
def scope_of(path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5555),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"OpenAI/Python 2.0"),
            (b"content-type", b"application/json"),
            (b"accept", b"application/json"),
            (b"x-org-id", b"bench-org"),
            (b"x-user-id", b"u1"),
            (b"content-length", str(len(body)).encode()),
        ],
        "state": {},
    }


async def drive(app: Any, path: str, body: bytes, requests: int, concurrency: int) -> float:
    """CPU µs per request of ``requests`` requests from ``concurrency`` tasks."""
    statuses: set[int] = set()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    async def worker(count: int) -> None:
        for _ in range(count):
            sent = False

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()
                return {"type": "http.disconnect"}

            await app(scope_of(path, body), receive, send)

    per = max(1, requests // concurrency)
    cpu = time.process_time()
    await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    cpu = time.process_time() - cpu
    if statuses != {200}:
        raise RuntimeError(f"unexpected statuses: {statuses}")
    return cpu / (per * concurrency) * 1e6


async def middleware_part(
    config_path: Path, args: argparse.Namespace, targets: dict[str, str]
) -> dict[str, list[float]]:
    """In-process CPU µs per request (middleware + app), per target, rounds alternating."""
    app = chat_app(config_path)
    gate = next(m.kwargs["gate"] for m in app.user_middleware)
    results: dict[str, list[float]] = {k: [] for k in targets}
    for path in targets.values():  # warm up: caches, seeding, the middleware stack
        await drive(app, path, CHAT_REQUEST, 2000, 32)
    for _ in range(args.rounds):
        for kind, path in targets.items():
            cpu = await drive(app, path, CHAT_REQUEST, args.requests, args.concurrency)
            await gate.meter.drain()
            results[kind].append(cpu)
    await gate.close()
    return results


async def stream_part(config_path: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    from gateway.commands.server import GatewayApp
    from gateway.config import load_config
    from gateway.metering.gate import CreditGate

    config = load_config(config_path)
    apps = {
        "fixed": GatewayApp(CreditGate(config), sync=False),
        "usage": GatewayApp(CreditGate(config), sync=False),
        "nodrain": GatewayApp(
            CreditGate(config.model_copy(update={"usage_drain_seconds": 0.0})), sync=False
        ),
    }
    paths = {"fixed": "fixed", "usage": "usage", "nodrain": "usage"}
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    sizes: list[int] = []

    async def one_stream(app: Any, path: str) -> None:
        got = size = 0

        async def receive() -> dict[str, Any]:
            nonlocal got
            if got == 0:
                got = 1
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal size
            if message["type"] == "http.response.body":
                size += len(message.get("body", b""))

        await app(scope_of(path, body), receive, send)
        sizes.append(size)

    async def run(kind: str, streams: int) -> float:
        app, path = apps[kind], f"/{paths[kind]}/v1/chat/completions"
        per = max(1, streams // args.stream_concurrency)

        async def worker() -> None:
            for _ in range(per):
                await one_stream(app, path)

        cpu = time.process_time()
        await asyncio.gather(*(worker() for _ in range(args.stream_concurrency)))
        cpu = time.process_time() - cpu
        return float(cpu / (per * args.stream_concurrency) * 1e6)

    results: dict[str, list[float]] = {kind: [] for kind in apps}
    for kind in results:
        await run(kind, 40)  # warm up
    expected = sum(len(e) for e in sse_events())
    if set(sizes) != {expected}:
        raise RuntimeError(f"streams arrived incomplete: {set(sizes)} != {expected}")
    for _ in range(args.rounds):
        for kind in results:
            results[kind].append(await run(kind, args.streams))
    for app in apps.values():
        await app.gate.meter.drain()
        if app.proxy is not None:
            await app.proxy.aclose()
        await app.gate.close()
    return results


RECORDS: list[dict[str, Any]] = []
"""Every report of this run (written by ``--json``)."""


def report(title: str, results: dict[str, list[float]], labels: dict[str, str]) -> None:
    """Per variant: the best round, and the median over rounds of its ratio to the first
    variant in the same round (what a busy machine disturbs least)."""
    base = next(iter(results))
    print(f"{title} (best round; median of the per-round ratios to {labels[base]!r}):")
    record: dict[str, Any] = {"title": title}
    for kind, label in labels.items():
        text = f"  {label:<40} {min(results[kind]):8.1f}"
        record[kind] = {"best": min(results[kind]), "rounds": results[kind]}
        if kind != base:
            ratios = [v / b for v, b in zip(results[kind], results[base], strict=True)]
            text += f"  ratio {statistics.median(ratios):.3f}"
            record[kind]["ratio"] = statistics.median(ratios)
        print(text)
    RECORDS.append(record)


NON_STREAMING = {
    "fixed": "fixed cost",
    "usage": "usage, numeric reserve",
    "auto": "usage, reserve: auto",
}
STREAMING = {
    "fixed": "tap off (fixed cost)",
    "usage": "tap on (usage cost)",
    "nodrain": "tap on, usage_drain_seconds: 0",
}


BODY_LABELS = {"fixed": "fixed cost", "usage": "usage: auto"}
BREAKDOWN = {
    "fixed": ("fixed", "", "fixed cost"),
    "header": ("hdr", "", "header cost (tap passes the body)"),
    "held": ("anth", "stub", "usage, no request read, read+price stub"),
    "read": ("any", "stub", "usage: auto, read+price stubbed"),
    "priced": ("any", "price", "usage: auto, price stubbed"),
    "usage": ("any", "", "usage: auto"),
}
"""``--parts breakdown``: the usage path with parts taken away (prefix, stubs, label)."""


async def breakdown_part(config_path: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """In process, the 2 KB OpenAI answer: where a usage cost's extra CPU goes, by stubbing
    the usage read (a constant Usage) and the price (a constant) in turn."""
    import gateway.metering.usage_tap as tap_module
    from gateway.usage import usage_from_json

    app = chat_app(config_path)
    gate = next(m.kwargs["gate"] for m in app.user_middleware)
    usage = usage_from_json(BODIES["openai2k"], "auto")
    read, price = tap_module.usage_from_json, tap_module.ResponseTap._price
    results: dict[str, list[float]] = {k: [] for k in BREAKDOWN}
    try:
        for warm in (True, False):
            for _ in range(1 if warm else args.rounds):
                for kind, (prefix, stub, _) in BREAKDOWN.items():
                    tap_module.usage_from_json = (lambda b, p: usage) if stub == "stub" else read  # type: ignore[assignment]
                    tap_module.ResponseTap._price = (lambda s, u: 100) if stub else price  # type: ignore[method-assign]
                    path = f"/{prefix}/openai2k/v1/chat/completions"
                    n = 2000 if warm else args.requests
                    cpu = await drive(app, path, CHAT_REQUEST, n, args.concurrency)
                    await gate.meter.drain()
                    if not warm:
                        results[kind].append(cpu)
    finally:
        tap_module.usage_from_json, tap_module.ResponseTap._price = read, price  # type: ignore[method-assign]
        await gate.close()
    return results


async def measured_here(config_path: Path, args: argparse.Namespace) -> None:
    if "inprocess" in args.parts:
        mw = await middleware_part(config_path, args, route_paths())
        report("non-streaming, in process (middleware + app), CPU µs/request", mw, NON_STREAMING)
    if "bodies-inprocess" in args.parts:
        for body in BODIES:
            mw = await middleware_part(config_path, args, body_paths(body))
            title = f"{body} ({len(BODIES[body])} B), in process (middleware + app), CPU µs/req"
            report(title, mw, BODY_LABELS)
    if "breakdown" in args.parts:
        parts = await breakdown_part(config_path, args)
        labels = {kind: label for kind, (_, _, label) in BREAKDOWN.items()}
        report("openai2k, in process, parts taken away, CPU µs/req", parts, labels)
    if "streams" not in args.parts:
        return
    st = await stream_part(config_path, args)
    report(f"{EVENTS}-event SSE stream through the proxy, CPU µs/stream", st, STREAMING)


def main(args: argparse.Namespace, redis_url: str, upstream: str) -> None:
    import uvloop

    workdir = Path(tempfile.mkdtemp(prefix="cg-bench-usage-"))
    config_path = workdir / "creditgate.yaml"
    prefix = "cgbu" + uuid.uuid4().hex[:8]
    config_path.write_text(CONFIG.format(redis_url=redis_url, upstream=upstream, prefix=prefix))
    for kind in ("proxy", "middleware"):
        if kind in args.parts:
            server = server_part(config_path, args, kind, route_paths())
            title = f"non-streaming, {kind} server under wrk, CPU µs/request"
            report(title, server, NON_STREAMING)
        if f"bodies-{kind}" in args.parts:
            for body in BODIES:
                server = server_part(config_path, args, kind, body_paths(body))
                title = f"{body} ({len(BODIES[body])} B), {kind} server under wrk, CPU µs/req"
                report(title, server, BODY_LABELS)
    os.sched_setaffinity(0, {0})
    uvloop.run(measured_here(config_path, args))
    if args.json:
        import gateway

        meta = {"tree": str(Path(gateway.__file__).parent.parent), "time": time.time()}
        with args.json.open("a") as out:
            out.write(json.dumps({**meta, "records": RECORDS}) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--stream-concurrency", type=int, default=100)
    parser.add_argument(
        "--event-gap", type=float, default=0.005, help="seconds between two stream events"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--parts",
        default="proxy,middleware,inprocess,streams",
        help="which measurements, comma-separated (default: all but the bodies-* parts: "
        "bodies-proxy, bodies-middleware, bodies-inprocess, or bodies for the three; and "
        "breakdown: where the usage path's CPU goes, in process)",
    )
    parser.add_argument("--tree", type=Path, help="measure this checkout's gateway package")
    parser.add_argument("--json", type=Path, help="append the results to this file")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-app", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--app-kind", default="middleware", help=argparse.SUPPRESS)
    options = parser.parse_args()
    options.parts = set(options.parts.split(","))
    if "bodies" in options.parts:
        options.parts |= {"bodies-proxy", "bodies-middleware", "bodies-inprocess"}
    if options.serve_upstream:
        serve_upstream(options.serve_upstream, options.event_gap)
        sys.exit(0)
    if options.serve_app:
        serve_app(options.serve_app, options.port, options.app_kind)
        sys.exit(0)
    os.sched_setaffinity(0, {1})
    with own_redis(1) as own:
        port = free_port()
        proc = subprocess.Popen(
            [
                *("taskset", "-c", "1", sys.executable, __file__),
                *("--serve-upstream", str(port), "--event-gap", str(options.event_gap)),
            ],
            start_new_session=True,
        )
        try:
            wait_listening(port, proc)
            main(options, own.url, f"http://127.0.0.1:{port}")
        finally:
            stop_process(proc)

"""Idempotency-Key in middleware mode (contract A9, issue 8 item 5): the app behind
``CreditGateMiddleware`` in process, on the tests' Redis and on a 3-master Redis Cluster.

A repeat of a completed request gets the stored response back byte for byte with
``Idempotent-Replayed: true``, without calling the app or charging again; another request
under the key is 422; a repeat while the first is in flight 409 with ``Retry-After``; a
response too large or streamed cannot be replayed (409); concurrent repeats call the app
and charge once; a usage-cost feature replays too; a refund releases the key. The
scenarios are in tests/support/idempotency_http.py, shared with the proxy's tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message

from gateway import CreditGate, CreditGateMiddleware
from gateway.commands.server import GatewayApp
from gateway.config import Config
from gateway.core.periods import FixedClock
from gateway.metering.replay import ResponseCapture, fingerprint_of, read_for_fingerprint
from gateway.redisio.connect import connect_redis
from tests.support import services
from tests.support.edge_apps import in_middleware_mode, outcomes
from tests.support.idempotency_http import (
    SCENARIOS,
    AppCalls,
    idempotency_app,
    idempotency_config,
    keyed,
)
from tests.support.redis_servers import Cluster, free_ports, start_cluster
from tests.support.reference import MID_NOVEMBER_MS

Scenario = Callable[[httpx.AsyncClient, CreditGate, AppCalls], Awaitable[None]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(free_ports(3, 7400, 7439, cluster=True)) as c:
        yield c


@pytest.fixture
async def redis_config() -> AsyncIterator[Config]:
    """The idempotency config on the tests' Redis, its keys deleted afterwards."""
    url = services.redis_url()
    config = idempotency_config(url)
    yield config
    client = connect_redis(url).client
    async for key in client.scan_iter(match=f"{config.key_prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_on_redis(redis_config: Config, scenario: Scenario) -> None:
    calls = AppCalls()
    async with in_middleware_mode(redis_config, idempotency_app(calls)) as (http, gate):
        await scenario(http, gate, calls)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_on_a_redis_cluster(cluster: Cluster, scenario: Scenario) -> None:
    calls = AppCalls()
    config = idempotency_config(cluster.url.split(",")[0])  # one seed: it finds the rest
    async with in_middleware_mode(config, idempotency_app(calls)) as (http, gate):
        assert gate.redis.cluster
        await scenario(http, gate, calls)


async def test_keys_are_per_org(redis_config: Config) -> None:
    """The same key in two orgs is two requests, each charged to its own org."""
    calls = AppCalls()
    async with in_middleware_mode(redis_config, idempotency_app(calls)) as (http, gate):
        await gate.set_plan("globex", "pro")
        a = await http.post("/generate", content=b"{}", headers=keyed("shared"))
        b = await http.post(
            "/generate", content=b"{}",
            headers={"X-Org-Id": "globex", "X-User-Id": "u1", "Idempotency-Key": "shared"},
        )  # fmt: skip
        assert (a.status_code, b.status_code) == (201, 201)
        assert "idempotent-replayed" not in b.headers and b.json()["call"] == 2
        await outcomes(gate, 1)
        await gate.meter.drain()
        for org in ("acme", "globex"):
            assert (await gate.balance(org)).buckets["goal_generation"].balance == 17


async def test_replays_and_refusals_are_counted(redis_config: Config) -> None:
    """/metrics tells replays (``replayed``) from charges and from refused repeats."""
    calls = AppCalls()
    async with in_middleware_mode(redis_config, idempotency_app(calls)) as (http, gate):
        before = gate.counters.requests()
        for _ in range(3):
            assert (await http.post("/generate", headers=keyed("m"))).status_code == 201
            await outcomes(gate, 1)
        r = await http.post("/generate", content=b"x", headers=keyed("m"))
        assert r.status_code == 422
        after = gate.counters.requests()

    def delta(outcome: str) -> int:
        key = ("goal_generation", outcome)
        return after.get(key, (0, 0))[0] - before.get(key, (0, 0))[0]

    assert (delta("charged"), delta("replayed"), delta("refused_reused")) == (1, 2, 1)
    assert calls.total == 1


async def test_a_request_without_a_key_never_reads_its_body_early(redis_config: Config) -> None:
    """Without Idempotency-Key the body is the app's to read as it streams (today's path):
    the app gets the first chunk before the client sent the second."""
    seen: list[bytes] = []
    second_sent = asyncio.Event()

    async def upload(request: Request) -> Response:
        async for chunk in request.stream():
            if chunk:
                seen.append(chunk)
                if len(seen) == 1:
                    assert not second_sent.is_set()
        return Response(b"ok")

    app = Starlette(routes=[Route("/generate", upload, methods=["POST"])])

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(0.05)
        second_sent.set()
        yield b"second"

    async with in_middleware_mode(redis_config, app) as (http, _):
        r = await http.post("/generate", content=body(), headers={"X-Org-Id": "acme"})
        assert r.status_code == 200 and seen == [b"first", b"second"]


# --- the pieces, without Redis -------------------------------------------------------------


def _receiver(messages: list[dict[str, object]]) -> Callable[[], Awaitable[dict[str, object]]]:
    queue = list(messages)

    async def receive() -> dict[str, object]:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    return receive


@pytest.mark.parametrize("chunk", [1, 7, 1000, 5000])
async def test_fingerprint_does_not_depend_on_chunking(chunk: int) -> None:
    body = bytes(range(256)) * 40  # 10,240 bytes, past a 4,096-byte limit
    scope = {"method": "POST", "headers": [(b"content-length", b"10240")], "query_string": b""}
    prints = set()
    for size in (chunk, len(body)):
        parts = [body[i : i + size] for i in range(0, len(body), size)]
        messages: list[dict[str, object]] = [
            {"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
            for i, p in enumerate(parts)
        ]
        read, fingerprinted = await read_for_fingerprint(_receiver(messages), limit=4096)
        assert read.body is None and not read.disconnected
        assert len(fingerprinted) == 4096 and fingerprinted == body[:4096]
        # Only what was read is kept for the app; the rest is still the server's.
        kept = b"".join(m["body"] for m in read.messages)
        assert body.startswith(kept) and len(kept) >= 4096
        prints.add(fingerprint_of(scope, "/generate", read, fingerprinted))
    assert len(prints) == 1
    whole, fp_whole = await read_for_fingerprint(
        _receiver([{"type": "http.request", "body": body[:4096]}]), limit=4096
    )
    assert whole.body == body[:4096]  # a whole body of exactly the limit is not "partial"
    assert fingerprint_of(scope, "/generate", whole, fp_whole) not in prints


async def test_a_client_gone_before_its_body_is_seen_as_such() -> None:
    read, _ = await read_for_fingerprint(_receiver([]))
    assert read.disconnected and read.messages == []


async def test_capture_keeps_the_client_view_and_marks_streams() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    capture = ResponseCapture(send, 10)
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"x-tokens-cost", b"3"),
        ],
    }
    await capture.send(start)
    await capture.send({"type": "http.response.body", "body": b"data: 1\n\n"})
    assert sent[0] is start and len(sent) == 2
    assert capture.stored().unreplayable == "streamed"
    capture = ResponseCapture(send, 10)
    await capture.send({"type": "http.response.start", "status": 200, "headers": []})
    await capture.send({"type": "http.response.body", "body": b"12345", "more_body": True})
    assert capture.stored().unreplayable == "streamed"  # never finished
    await capture.send({"type": "http.response.body", "body": b"678901"})
    assert capture.stored().unreplayable == "too_large"
    small = ResponseCapture(send, 10)
    await small.send({"type": "http.response.start", "status": 201, "headers": [
        (b"etag", b'"e"'), (b"x-tokens-remaining", b"5"), (b"x-creditgate-request-id", b"r")]}
    )  # fmt: skip
    await small.send({"type": "http.response.body", "body": b"abc", "more_body": True})
    await small.send({"type": "http.response.body", "body": b"def"})
    stored = small.stored()
    assert (stored.status, stored.headers, stored.body) == (201, ((b"etag", b'"e"'),), b"abcdef")


def test_middleware_is_what_the_proxy_runs() -> None:
    """One implementation for both modes: the proxy server wraps UpstreamProxy in this
    same middleware class."""
    gate = CreditGate(idempotency_config("memory://x"), clock=FixedClock(MID_NOVEMBER_MS))
    served = GatewayApp(gate, sync=False)
    assert isinstance(served.metered, CreditGateMiddleware)
    assert served.metered.meter is gate.meter

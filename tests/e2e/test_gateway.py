"""The gateway end to end on the real Redis: proxy in front of a real upstream over TCP.

The upstream is gateway.commands.sample_app (the five AI routes) or
tests/support/upstream_app.py, served by
uvicorn in a thread; the gateway is GatewayApp, also served by uvicorn, so every byte goes
through real sockets. Identity uses trusted headers here (API keys need Postgres: see
test_gateway_pg.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest

from gateway.commands.sample_app import app as sample_app
from gateway.commands.server import GatewayApp
from gateway.config import Config
from gateway.core.events import decode
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from tests.support.reference import MID_NOVEMBER_MS, reference_config
from tests.support.services import redis_url
from tests.support.upstream_app import app as echo_upstream
from tests.support.upstream_app import serve_in_thread

DAY_MS = 86_400_000
REDIS = redis_url()  # the tests' Redis; the module is skipped without one


@contextmanager
def gateway(config: Config, clock: FixedClock) -> Iterator[tuple[str, CreditGate]]:
    """Serve GatewayApp for ``config`` over TCP; yield its URL and a gate for inspection."""
    served = GatewayApp(CreditGate(config, clock=clock), sync=False)
    inspect = CreditGate(config, clock=clock)
    with serve_in_thread(served) as url:
        yield url, inspect


async def cleanup(prefix: str) -> None:
    client = connect_redis(REDIS).client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"cgt{uuid.uuid4().hex[:10]}"
    yield p
    asyncio.run(cleanup(p))


@pytest.fixture
def sample_upstream() -> Iterator[str]:
    with serve_in_thread(sample_app) as url:
        yield url


def org_headers(org: str, user: str = "u1") -> dict[str, str]:
    return {"X-Org-Id": org, "X-User-Id": user}


async def test_seed_smoke_through_the_proxy(sample_upstream: str, prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url=REDIS, key_prefix=prefix, upstream=sample_upstream)
    with gateway(config, clock) as (url, gate):
        await gate.set_plan("pro-org", "pro")
        await gate.set_plan("starter-org", "starter")
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post("/api/v1/goals/g1/quests", headers=org_headers("pro-org"))
            assert r.status_code == 200, r.text
            assert r.json()["quests"] and r.json()["org"] == "pro-org"
            assert r.json()["feature"] == "goal_generation"
            assert r.headers["x-tokens-cost"] == "3"
            assert r.headers["x-tokens-remaining"] == "17"
            assert r.headers["ratelimit-limit"] == "20"
            assert r.headers["ratelimit-remaining"] == "19"
            await gate.meter.drain()
            assert (await gate.balance("pro-org")).buckets["goal_generation"].balance == 17

            r = await http.post("/api/v1/goals/g1/quests", headers=org_headers("starter-org"))
            assert r.status_code == 403
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "feature_not_in_plan"

            for _ in range(5):
                r = await http.post("/api/v1/goals/g1/quests", headers=org_headers("pro-org"))
                assert r.status_code == 200
            r = await http.post("/api/v1/goals/g1/quests", headers=org_headers("pro-org"))
            assert r.status_code == 402
            body = r.json()
            assert body["code"] == "insufficient_tokens" and body["balance"] == 2
            assert body["cost"] == 3 and body["feature"] == "goal_generation"
            assert body["refresh_at"].startswith("2026-12-01T00:00:00")

            # The counters moved with the traffic (METRICS is per process: compare deltas).
            metrics = (await http.get("/metrics")).text
            assert (
                'creditgate_requests_total{feature="goal_generation",outcome="charged"}' in metrics
            )
            assert 'creditgate_denials_total{reason="insufficient"}' in metrics
            assert "creditgate_admit_seconds_count" in metrics

            clock.advance(20 * DAY_MS)  # the next month
            r = await http.post("/api/v1/goals/g1/quests", headers=org_headers("pro-org"))
            assert r.status_code == 200 and r.headers["x-tokens-remaining"] == "17"
        await gate.close()


async def test_unmatched_routes_pass_through_uncharged(sample_upstream: str, prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url=REDIS, key_prefix=prefix, upstream=sample_upstream)
    with gateway(config, clock) as (url, gate):
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.get("/")  # no credentials needed: not metered
            assert r.status_code == 200 and r.json()["metered"] is False
            assert "x-tokens-cost" not in r.headers
            r = await http.post("/api/v1/goals/g1/quests")
            assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
        await gate.close()


@pytest.mark.parametrize(
    "path",
    [
        "//api/v1/goals/g1/quests",
        "/api/v1/goals/g1/quests/",
        "/api/v1/./goals/g1/quests",
        "/api/v1/x/../goals/g1/quests",
        "/api/%76%31/goals/g1/quests",
        "/api/v1/goals/g1/quest%73",
        "/api/v1//goals//g1/quests",
    ],
)
async def test_no_spelling_reaches_the_upstream_uncharged(
    sample_upstream: str, prefix: str, path: str
) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url=REDIS, key_prefix=prefix, upstream=sample_upstream)
    with gateway(config, clock) as (url, gate):
        await gate.set_plan("acme", "pro")
        async with httpx.AsyncClient(base_url=url) as http:
            # httpx would normalise some spellings itself: send the raw target.
            r = await http.request("POST", httpx.URL(url + path), headers=org_headers("acme"))
            assert r.status_code == 200, (path, r.status_code, r.text)
            assert r.headers["x-tokens-cost"] == "3"
        await gate.meter.drain()
        assert (await gate.balance("acme")).buckets["goal_generation"].balance == 17
        await gate.close()


async def test_encoded_slash_in_a_metered_path_is_refused(
    sample_upstream: str, prefix: str
) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url=REDIS, key_prefix=prefix, upstream=sample_upstream)
    with gateway(config, clock) as (url, gate):
        await gate.set_plan("acme", "pro")
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post(
                httpx.URL(url + "/api/v1/goals%2Fg1/quests"), headers=org_headers("acme")
            )
            assert r.status_code == 400
            r = await http.post(
                httpx.URL(url + "/api/v1/goals/g1\\quests"), headers=org_headers("acme")
            )
            assert r.status_code in (400, 404)
        await gate.close()


@asynccontextmanager
async def echo_gateway(
    prefix: str, routes: list[dict[str, str]] | None = None, **overrides: Any
) -> AsyncIterator[tuple[str, CreditGate]]:
    """GatewayApp in front of the echo upstream (tests/support/upstream_app.py) with the reference
    config (``routes`` and other fields overridden), org acme on plan pro."""
    if routes is not None:
        overrides["routes"] = routes
    with serve_in_thread(echo_upstream) as upstream:
        config = reference_config(
            redis_url=REDIS, key_prefix=prefix, upstream=upstream, **overrides
        )
        with gateway(config, FixedClock(MID_NOVEMBER_MS)) as (url, gate):
            await gate.set_plan("acme", "pro")
            yield url, gate


@pytest.mark.parametrize(
    "path",
    ["/api/v1/goals/g1/quests;jsessionid=1", "/x/..;/api/v1/goals/g1/quests"],
)
async def test_path_parameters_on_a_metered_route_never_reach_the_upstream(
    prefix: str, path: str
) -> None:
    """A Java upstream would route these to the metered handler: refused, nothing forwarded."""
    async with echo_gateway(prefix) as (url, gate):
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.request("POST", httpx.URL(url + path), headers=org_headers("acme"))
            assert r.status_code == 400, r.text
            assert r.json()["code"] == "bad_path"
            assert "path parameters" in r.json()["detail"]
            # An unmetered path with parameters is forwarded as before.
            r = await http.get(httpx.URL(url + "/echo/app.js;v=3"))
            assert r.status_code == 200 and r.json()["path"] == "/echo/app.js;v=3"
        assert (await gate.balance("acme")).buckets["goal_generation"].balance == 20
        await gate.close()


@pytest.mark.parametrize("keep", [True, False])
async def test_trailing_slash_forwarding(prefix: str, keep: bool) -> None:
    routes = [{"method": "POST", "path": "/echo/{p:path}", "feature": "goal_generation"}]
    async with echo_gateway(prefix, routes, forward_trailing_slash=keep) as (url, gate):
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post(httpx.URL(url + "/echo/a/b/"), headers=org_headers("acme"))
        assert r.status_code == 200 and r.headers["x-tokens-cost"] == "3"
        assert r.json()["path"] == ("/echo/a/b/" if keep else "/echo/a/b")
        await gate.meter.drain()
        assert (await gate.balance("acme")).buckets["goal_generation"].balance == 17
        await gate.close()


@pytest.mark.parametrize("mode", ["chunked", "big"])
async def test_upstream_cut_off_mid_body_reaches_the_client_cut_off_and_refunded(
    prefix: str, mode: str
) -> None:
    """An upstream that dies after its headers: the client must not get a clean end (an
    LLM answer cut in half would look complete), and the call is refunded."""
    routes = [{"method": "GET", "path": "/abort", "feature": "goal_generation"}]
    async with echo_gateway(prefix, routes) as (url, gate):
        async with httpx.AsyncClient(base_url=url) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(f"/abort?mode={mode}", headers=org_headers("acme"))
            # The gateway itself is fine: the next call works.
            r = await http.get("/echo/after")
            assert r.status_code == 200
        stream = gate.keys.shard("acme").events
        kinds: list[str] = []
        for _ in range(100):  # the served gate settles in its own loop
            kinds = [
                e.kind
                for e in (decode(f) for _, f in await gate.redis.client.xrange(stream))
                if e.org == "acme" and e.kind in ("charge", "refund")
            ]
            if kinds:
                break
            await asyncio.sleep(0.05)
        assert kinds == ["refund"]
        assert (await gate.balance("acme")).buckets["goal_generation"].balance == 20
        await gate.close()


async def test_spoofed_identity_headers_are_replaced(prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    with serve_in_thread(echo_upstream) as upstream:
        config = reference_config(
            redis_url=REDIS, key_prefix=prefix, upstream=upstream,
            routes=[{"method": "POST", "path": "/echo/{p:path}", "feature": "general_insights"}],
        )  # fmt: skip
        with gateway(config, clock) as (url, gate):
            await gate.set_plan("acme", "pro")
            async with httpx.AsyncClient(base_url=url) as http:
                r = await http.post(
                    "/echo/x?q=1",
                    headers={**org_headers("acme"), "X-Creditgate-Org": "victim",
                             "X-Creditgate-Feature": "free", "X-HTTP-Method-Override": "GET"},
                    content=b"hello",
                )  # fmt: skip
            assert r.status_code == 200
            seen: dict[str, list[str]] = {}
            for name, value in r.json()["headers"]:
                seen.setdefault(name.lower(), []).append(value)
            assert seen["x-creditgate-org"] == ["acme"]
            assert seen["x-creditgate-feature"] == ["general_insights"]
            assert "x-http-method-override" not in seen
            assert r.json()["body"] == "hello" and r.json()["query_string"] == "q=1"
            await gate.close()


async def test_upstream_500_is_refunded_and_client_sees_it(prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    with serve_in_thread(echo_upstream) as upstream:
        config = reference_config(
            redis_url=REDIS, key_prefix=prefix, upstream=upstream,
            routes=[{"method": "GET", "path": "/status/{code}", "feature": "lead_generation"}],
        )  # fmt: skip
        with gateway(config, clock) as (url, gate):
            await gate.set_plan("acme", "pro")
            async with httpx.AsyncClient(base_url=url) as http:
                r = await http.get("/status/500", headers=org_headers("acme"))
                assert r.status_code == 500
                r = await http.get("/status/201", headers=org_headers("acme"))
                assert r.status_code == 201
            await gate.meter.drain()
            await asyncio.sleep(0.2)  # the served gate settles in its own loop
            assert (await gate.balance("acme")).buckets["lead_generation"].balance == 55
            stream = gate.keys.shard("acme").events
            rows = [decode(f) for _, f in await gate.redis.client.xrange(stream)]
            by_kind = sorted(
                (e.kind, e.upstream_status, e.tokens)
                for e in rows
                if e.org == "acme" and e.kind in ("charge", "refund")
            )
            assert by_kind == [("charge", 201, 5), ("refund", 500, 0)]
            await gate.close()


async def test_upstream_down_is_502_and_refunded(prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url=REDIS, key_prefix=prefix, upstream="http://127.0.0.1:9")
    with gateway(config, clock) as (url, gate):
        await gate.set_plan("acme", "pro")
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post("/api/v1/leads/generate", headers=org_headers("acme"))
        assert r.status_code == 502
        await asyncio.sleep(0.2)
        assert (await gate.balance("acme")).buckets["lead_generation"].balance == 60
        await gate.close()


async def test_idempotency_key_through_the_proxy(sample_upstream: str, prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url=REDIS, key_prefix=prefix, upstream=sample_upstream)
    with gateway(config, clock) as (url, gate):
        await gate.set_plan("acme", "pro")
        headers = {**org_headers("acme"), "Idempotency-Key": "order-42"}
        async with httpx.AsyncClient(base_url=url) as http:
            first = await http.post("/api/v1/leads/generate", headers=headers)
            await asyncio.sleep(0.1)
            second = await http.post("/api/v1/leads/generate", headers=headers)
        assert first.status_code == 200
        # Contract A9: the stored response comes back, neither forwarded nor charged again.
        assert second.status_code == 200 and second.headers["idempotent-replayed"] == "true"
        assert second.content == first.content and second.headers["x-tokens-cost"] == "0"
        assert (await gate.balance("acme")).buckets["lead_generation"].balance == 55
        await gate.close()


async def test_sse_streams_through_without_buffering(prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    with serve_in_thread(echo_upstream) as upstream:
        config = reference_config(
            redis_url=REDIS, key_prefix=prefix, upstream=upstream,
            routes=[{"method": "GET", "path": "/sse", "feature": "general_insights"}],
        )  # fmt: skip
        with gateway(config, clock) as (url, gate):
            await gate.set_plan("acme", "pro")
            gate_name = uuid.uuid4().hex
            async with (
                httpx.AsyncClient(base_url=url, timeout=10) as http,
                http.stream("GET", f"/sse?n=3&gate={gate_name}", headers=org_headers("acme")) as r,
            ):
                assert r.status_code == 200
                chunks = r.aiter_raw()
                first = await asyncio.wait_for(chunks.__anext__(), timeout=5)
                # The upstream is still waiting on the gate: the first event arrived
                # before the upstream finished, so nothing buffered it.
                assert b"data: 0" in first
                async with httpx.AsyncClient(base_url=upstream) as ctl:
                    progress = (await ctl.get(f"/control/progress/{gate_name}")).json()
                    assert progress.get("state") != "finished"
                    await ctl.post(f"/control/release/{gate_name}")
                rest = b"".join([c async for c in chunks])
                assert b"data: 2" in rest
            await asyncio.sleep(0.2)
            assert (await gate.balance("acme")).buckets["general_insights"].balance == 39
            await gate.close()


async def test_500_concurrent_requests_on_20_tokens_at_cost_3(redisgate: CreditGate) -> None:
    await redisgate.set_plan("race", "pro")
    results = await asyncio.gather(
        *(redisgate.meter.admit("race", "goal_generation", user=f"u{i % 7}") for i in range(500))
    )
    ok = [a for a in results if a.ok]
    statuses = {a.status for a in results}
    assert len(ok) == 6, statuses
    assert statuses <= {"ok", "insufficient", "rate_limited"}
    await asyncio.gather(
        *(redisgate.meter.settle(a, ok=True, status=200, latency_ms=1) for a in ok)
    )
    assert (await redisgate.balance("race")).buckets["goal_generation"].balance == 2


async def test_concurrent_requests_through_the_proxy_never_overspend(
    sample_upstream: str, prefix: str
) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url=REDIS, key_prefix=prefix, upstream=sample_upstream)
    with gateway(config, clock) as (url, gate):
        await gate.set_plan("race", "enterprise")  # 600/minute: the balance is the limit
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
            rs = await asyncio.gather(
                *(http.post("/api/v1/leads/generate", headers=org_headers("race", f"u{i}"))
                  for i in range(150))
            )  # fmt: skip
        codes = [r.status_code for r in rs]
        assert codes.count(200) == 100 and codes.count(402) == 50, sorted(set(codes))
        await asyncio.sleep(0.3)
        assert (await gate.balance("race")).buckets["lead_generation"].balance == 0
        await gate.close()


def _problem(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"] == "application/problem+json"
    data: dict[str, Any] = json.loads(r.content)
    return data


async def test_rate_limit_429_with_retry_after(sample_upstream: str, prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url=REDIS, key_prefix=prefix, upstream=sample_upstream)
    with gateway(config, clock) as (url, gate):
        await gate.set_plan("acme", "pro")
        await gate.grant("acme", "general_insights", 100, reference="t")
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(20):
                r = await http.get("/api/v1/insights/x", headers=org_headers("acme", "eve"))
                assert r.status_code == 200
            r = await http.get("/api/v1/insights/x", headers=org_headers("acme", "eve"))
        assert r.status_code == 429
        body = _problem(r)
        assert body["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
        assert r.headers["ratelimit-remaining"] == "0"
        await gate.close()


async def test_redis_down_fails_closed_with_503(sample_upstream: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url="redis://127.0.0.1:1/0", upstream=sample_upstream)
    with gateway(config, clock) as (url, _gate):
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post("/api/v1/leads/generate", headers=org_headers("acme"))
    assert r.status_code == 503 and "retry-after" in r.headers
    assert _problem(r)["code"] == "unavailable"


async def test_redis_down_fail_open_passes_uncharged(sample_upstream: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(
        redis_url="redis://127.0.0.1:1/0", upstream=sample_upstream, fail_open=True
    )
    with gateway(config, clock) as (url, _gate):
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post("/api/v1/leads/generate", headers=org_headers("acme"))
    assert r.status_code == 200 and "x-tokens-cost" not in r.headers
    assert r.json()["org"] == "acme"

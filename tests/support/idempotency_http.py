"""Idempotency-Key over HTTP (contract A9) in both modes: the app behind creditgate, its
config, and the scenarios that tests/metering/test_middleware_idempotency.py (middleware
mode) and tests/e2e/test_proxy_idempotency.py (proxy mode) run on one Redis and on a Redis
Cluster.

The app counts its calls (thread-safe: in proxy mode it runs in a server thread) and
answers with headers of every kind, so that a replay can be compared header by header.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from collections import Counter
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.config import Config
from gateway.metering.gate import CreditGate
from tests.support.edge_apps import balance, outcomes
from tests.support.reference import reference_config

ORG = {"X-Org-Id": "acme", "X-User-Id": "u1"}
MAX_REPLAY_BODY = 4096
ROUTES = [
    {"method": "POST", "path": "/generate", "feature": "goal_generation"},
    {"method": "PUT", "path": "/generate", "feature": "goal_generation"},
    {"method": "POST", "path": "/other", "feature": "goal_generation"},
    {"method": "POST", "path": "/slow", "feature": "goal_generation"},
    {"method": "POST", "path": "/big", "feature": "goal_generation"},
    {"method": "POST", "path": "/sse", "feature": "goal_generation"},
    {"method": "GET", "path": "/status/{code}", "feature": "goal_generation"},
    {"method": "POST", "path": "/v1/chat/completions", "feature": "lead_generation"},
]
# lead_generation is charged by the usage the answer reports (contract A8): 1,000 prompt
# tokens at 4 and 500 completion tokens at 8 per 1,000 make 8.
USAGE_FEATURE = {"cost": {"usage": "openai", "reserve": 20, "max": 30}}
MODELS = {"gpt-*": {"input": 4, "output": 8}, "default": {"input": 4, "output": 8}}
USAGE_COST = 8
# Headers a replay must give back as they were, and those it must not.
APP_HEADERS = {
    "etag": '"v1"',
    "cache-control": "no-store",
    "content-language": "en",
    "location": "/generate/42",
    "x-app-trace": "trace-1",
}
NEVER_REPLAYED = ("set-cookie", "date", "x-creditgate-request-id", "ratelimit-remaining")


def idempotency_config(redis_url: str, key_prefix: str | None = None) -> Config:
    """The reference config with :data:`ROUTES`, a usage-cost lead_generation and a small
    replay limit (:data:`MAX_REPLAY_BODY`)."""
    features = {
        "lead_generation": USAGE_FEATURE, "goal_generation": {"cost": 3},
        "strategy_analysis": {"cost": 2}, "revenue_forecast": {"cost": 4},
        "general_insights": {"cost": 1},
    }  # fmt: skip
    return reference_config(
        redis_url=redis_url, key_prefix=key_prefix or f"cgi{uuid.uuid4().hex[:10]}",
        routes=ROUTES, models=MODELS, features=features,
        idempotency_max_body_bytes=MAX_REPLAY_BODY,
    )  # fmt: skip


class AppCalls:
    """What reached the app: calls per path, the bodies it received, and the gate that
    holds ``/slow`` until :meth:`release`."""

    def __init__(self) -> None:
        self.paths: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self.started = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()

    def record(self, path: str, body: bytes) -> int:
        with self._lock:
            self.paths[path] += 1
            self.bodies.append(body)
            return self.paths[path]

    def release(self) -> None:
        self._release.set()

    async def wait_released(self) -> None:
        self.started.set()
        # A threading.Event (the app may run in a server thread), waited off the loop.
        await asyncio.to_thread(self._release.wait, 30)

    @property
    def total(self) -> int:
        return sum(self.paths.values())


def idempotency_app(calls: AppCalls) -> Starlette:
    """The app behind creditgate; each handler records its call and the body it got."""

    async def generate(request: Request) -> Response:
        body = await request.body()
        n = calls.record(request.url.path, body)
        doc = {"call": n, "sha": hashlib.sha256(body).hexdigest(), "len": len(body)}
        response = JSONResponse(doc, status_code=201, headers=APP_HEADERS)
        response.set_cookie("session", f"s{n}")
        return response

    async def slow(request: Request) -> Response:
        calls.record(request.url.path, await request.body())
        await calls.wait_released()
        return JSONResponse({"slow": "done"})

    async def big(request: Request) -> Response:
        calls.record(request.url.path, await request.body())
        return Response(b"x" * (MAX_REPLAY_BODY + 1), media_type="application/octet-stream")

    async def sse(request: Request) -> Response:
        calls.record(request.url.path, await request.body())

        async def events() -> Any:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def status(request: Request) -> Response:
        calls.record(request.url.path, b"")
        return JSONResponse({"status": 1}, status_code=int(request.path_params["code"]))

    async def chat(request: Request) -> Response:
        calls.record(request.url.path, await request.body())
        return JSONResponse({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500},
        })  # fmt: skip

    return Starlette(
        routes=[
            Route("/generate", generate, methods=["POST", "PUT"]),
            Route("/other", generate, methods=["POST"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/big", big, methods=["POST"]),
            Route("/sse", sse, methods=["POST"]),
            Route("/status/{code:int}", status, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


def keyed(key: str) -> dict[str, str]:
    return {**ORG, "Idempotency-Key": key}


def conflict(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``r`` is a problem+json ``status`` with ``code``; its document."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    doc: dict[str, Any] = r.json()
    assert doc["code"] == code
    return doc


# Headers a server adds to every answer (uvicorn: in proxy mode both the upstream's and the
# gateway's are there): never compared.
_SERVER_HEADERS = ("date", "server")
_OURS = ("x-tokens-", "ratelimit-", "x-creditgate-", "idempotent-replayed")


def _app_view(response: httpx.Response) -> list[tuple[str, str]]:
    return [
        (name, value)
        for name, value in response.headers.multi_items()
        if name not in (*_SERVER_HEADERS, "set-cookie", "content-length")
        and not name.startswith(_OURS)
    ]


def assert_replay_of(first: httpx.Response, again: httpx.Response) -> None:
    """``again`` is ``first`` given back: same status and body bytes, the app's headers as
    they were (same names, values and order), the creditgate replay headers, none of the
    headers never replayed."""
    assert again.status_code == first.status_code
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-tokens-cost"] == "0"
    assert again.headers.get_list("content-length") == [str(len(first.content))]
    assert "idempotent-replayed" not in first.headers
    assert _app_view(again) == _app_view(first)
    for name in (*APP_HEADERS, "content-type"):
        if name in first.headers:
            assert again.headers.get_list(name) == first.headers.get_list(name), name
    for name in NEVER_REPLAYED:
        assert name not in again.headers or name in _SERVER_HEADERS, name
    # The first answer's Date is not given back: at most the serving server's own.
    assert len(again.headers.get_list("date")) <= 1
    assert "x-tokens-remaining" not in again.headers


async def settled_balance(gate: CreditGate, charges: int, bucket: str = "goal_generation") -> int:
    """Org acme's balance once ``charges`` settles are in its event stream."""
    await outcomes(gate, charges)
    return await balance(gate, bucket)


# --- the scenarios, each on an http client in front of the app and the gate metering it ---


async def replay_is_the_stored_response(
    http: httpx.AsyncClient, gate: CreditGate, calls: AppCalls
) -> None:
    body = json.dumps({"quest": "slay the dragon", "n": 1}).encode()
    first = await http.post("/generate", content=body, headers=keyed("k-replay"))
    assert first.status_code == 201, first.text
    assert first.headers["x-tokens-cost"] == "3" and "set-cookie" in first.headers
    assert first.json()["sha"] == hashlib.sha256(body).hexdigest()  # the body reached the app
    assert await outcomes(gate, 1) == [("charge", 201, 3)]
    for _ in range(3):
        again = await http.post("/generate", content=body, headers=keyed("k-replay"))
        assert_replay_of(first, again)
    assert calls.paths["/generate"] == 1
    assert calls.bodies == [body]
    assert await settled_balance(gate, 1) == 17
    assert await outcomes(gate, 1) == [("charge", 201, 3)]  # no second charge or refund
    # Another key is another request.
    other = await http.post("/generate", content=body, headers=keyed("k-other"))
    assert other.status_code == 201 and other.json()["call"] == 2
    assert await settled_balance(gate, 2) == 14


async def another_request_under_the_key_is_422(
    http: httpx.AsyncClient, gate: CreditGate, calls: AppCalls
) -> None:
    body = b'{"quest": "one"}'
    first = await http.post("/generate", content=body, headers=keyed("k-reuse"))
    assert first.status_code == 201
    await outcomes(gate, 1)
    changed = [
        http.post("/generate", content=b'{"quest": "two"}', headers=keyed("k-reuse")),
        http.post("/other", content=body, headers=keyed("k-reuse")),
        http.put("/generate", content=body, headers=keyed("k-reuse")),
        http.post("/generate?x=1", content=body, headers=keyed("k-reuse")),
    ]
    for call in changed:
        doc = conflict(await call, 422, "idempotency_key_reused")
        assert "another method, path or body" in doc["detail"]
    assert calls.total == 1
    assert await settled_balance(gate, 1) == 17
    # The first request still replays.
    assert_replay_of(first, await http.post("/generate", content=body, headers=keyed("k-reuse")))


async def in_flight_is_409_with_retry_after(
    http: httpx.AsyncClient, gate: CreditGate, calls: AppCalls
) -> None:
    first = asyncio.create_task(http.post("/slow", content=b"{}", headers=keyed("k-slow")))
    for _ in range(500):
        if calls.started.is_set():
            break
        await asyncio.sleep(0.01)
    assert calls.started.is_set()
    busy = await http.post("/slow", content=b"{}", headers=keyed("k-slow"))
    doc = conflict(busy, 409, "idempotency_conflict")
    assert busy.headers["retry-after"] == "1" and doc["retry_after"] == 1
    assert "in progress" in doc["detail"]
    # Another body under the key while the first is in flight: 422 all the same.
    conflict(await http.post("/slow", content=b"[]", headers=keyed("k-slow")), 422,
             "idempotency_key_reused")  # fmt: skip
    calls.release()
    done = await first
    assert done.status_code == 200 and done.json() == {"slow": "done"}
    await outcomes(gate, 1)
    assert_replay_of(done, await http.post("/slow", content=b"{}", headers=keyed("k-slow")))
    assert calls.paths["/slow"] == 1
    assert await settled_balance(gate, 1) == 17


async def unreplayable_responses_are_409(
    http: httpx.AsyncClient, gate: CreditGate, calls: AppCalls
) -> None:
    big = await http.post("/big", headers=keyed("k-big"))
    assert big.status_code == 200 and len(big.content) == MAX_REPLAY_BODY + 1
    sse = await http.post("/sse", headers=keyed("k-sse"))
    assert sse.status_code == 200 and sse.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    await outcomes(gate, 2)
    for path, key, why in (("/big", "k-big", "larger than"), ("/sse", "k-sse", "streamed")):
        doc = conflict(await http.post(path, headers=keyed(key)), 409, "idempotency_conflict")
        assert doc["replayable"] is False and doc["original_status"] == "200"
        assert why in doc["detail"] and "not charged or forwarded again" in doc["detail"]
    assert calls.paths == Counter({"/big": 1, "/sse": 1})
    assert await settled_balance(gate, 2) == 14
    assert await outcomes(gate, 2) == [("charge", 200, 3)] * 2


async def concurrent_repeats_call_and_charge_once(
    http: httpx.AsyncClient, gate: CreditGate, calls: AppCalls, n: int = 40
) -> None:
    body = b'{"quest": "race"}'
    answers = await asyncio.gather(
        *(http.post("/generate", content=body, headers=keyed("k-race")) for _ in range(n))
    )
    fresh = [r for r in answers if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1, [r.status_code for r in answers]
    for r in answers:
        if r is fresh[0]:
            continue
        if r.status_code == 409:
            assert r.json()["code"] == "idempotency_conflict" and r.headers["retry-after"] == "1"
        else:
            assert_replay_of(fresh[0], r)
    assert calls.paths["/generate"] == 1
    assert await settled_balance(gate, 1) == 17
    assert await outcomes(gate, 1) == [("charge", 201, 3)]


async def usage_cost_feature_replays(
    http: httpx.AsyncClient, gate: CreditGate, calls: AppCalls
) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    first = await http.post("/v1/chat/completions", content=body, headers=keyed("k-chat"))
    assert first.status_code == 200, first.text
    assert first.headers["x-tokens-cost"] == str(USAGE_COST)
    await outcomes(gate, 1)
    again = await http.post("/v1/chat/completions", content=body, headers=keyed("k-chat"))
    assert_replay_of(first, again)
    assert again.json()["usage"]["total_tokens"] == 1500
    changed = body.replace("hi", "hello")
    conflict(await http.post("/v1/chat/completions", content=changed, headers=keyed("k-chat")),
             422, "idempotency_key_reused")  # fmt: skip
    assert calls.paths["/v1/chat/completions"] == 1
    assert calls.bodies == [body.encode()]
    assert await settled_balance(gate, 1, "lead_generation") == 60 - USAGE_COST


async def refunded_request_releases_its_key(
    http: httpx.AsyncClient, gate: CreditGate, calls: AppCalls
) -> None:
    failed = await http.get("/status/503", headers=keyed("k-503"))
    assert failed.status_code == 503 and failed.headers["x-tokens-cost"] == "0"
    assert await outcomes(gate, 1) == [("refund", 503, 0)]
    # Nothing was kept: the retry is forwarded again and, refunded again, costs nothing.
    again = await http.get("/status/503", headers=keyed("k-503"))
    assert again.status_code == 503 and "idempotent-replayed" not in again.headers
    assert calls.paths["/status/503"] == 2
    assert await outcomes(gate, 2) == [("refund", 503, 0)] * 2
    assert await balance(gate) == 20


async def large_request_body_reaches_the_app_whole(
    http: httpx.AsyncClient, gate: CreditGate, calls: AppCalls
) -> None:
    """A body past the read limit (1 MiB) still reaches the app unchanged; it is
    fingerprinted by its first MiB and its length."""
    size = (1 << 20) + 12345
    body = bytes(i % 251 for i in range(size))
    first = await http.post("/generate", content=body, headers=keyed("k-large"))
    assert first.status_code == 201
    assert first.json() == {"call": 1, "sha": hashlib.sha256(body).hexdigest(), "len": size}
    await outcomes(gate, 1)
    assert_replay_of(first, await http.post("/generate", content=body, headers=keyed("k-large")))
    other_start = b"!" + body[1:]
    conflict(await http.post("/generate", content=other_start, headers=keyed("k-large")), 422,
             "idempotency_key_reused")  # fmt: skip
    conflict(await http.post("/generate", content=body + b"!", headers=keyed("k-large")), 422,
             "idempotency_key_reused")  # fmt: skip
    assert calls.paths["/generate"] == 1
    assert await settled_balance(gate, 1) == 17


SCENARIOS = [
    replay_is_the_stored_response,
    another_request_under_the_key_is_422,
    in_flight_is_409_with_retry_after,
    unreplayable_responses_are_409,
    concurrent_repeats_call_and_charge_once,
    usage_cost_feature_replays,
    refunded_request_releases_its_key,
    large_request_body_reaches_the_app_whole,
]
"""Every scenario; the two test modules run each in their mode on one Redis and a cluster."""

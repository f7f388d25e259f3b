"""A metered request leaves no reference cycle behind (real Redis, the production client).

A request whose objects form a cycle is freed only by the cycle collector, whose passes
cost every request more than the cycle's own objects (the fixed-cost path's `send_wrapper`
closure held the scope's state, which held `send_wrapper` in its splice declaration: ~9k
instructions per request of collector work, BENCHMARKS.md section 1, round 7). The
middleware drops its declarations when the request ends; this test counts what the
collector finds after a few hundred requests with collection switched off.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator, Callable
from contextvars import Context
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import CreditGate, CreditGateMiddleware
from gateway.core.logs import REQUEST_ID
from tests.support.reference import REFERENCE_YAML
from tests.support.services import redis_url

REQUESTS = 300
# A few objects may be collected once (caches filled by the first requests of a kind, the
# event loop's own bookkeeping); a cycle per request would be thousands.
AT_MOST = REQUESTS // 10


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def request(org: str) -> tuple[dict[str, Any], Any]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/api/v1/goals/g1/quests",
        "raw_path": b"/api/v1/goals/g1/quests", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"test"), (b"content-length", b"2")],
        "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000),
        "state": {"creditgate_org": org, "creditgate_user": "u1"},
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    return scope, receive


class Starts:
    """The ``send`` of a request: the status and headers of each response start, in order."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.headers: list[dict[bytes, bytes]] = []

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.statuses.append(message["status"])
            self.headers.append(dict(message["headers"]))


def watch_charge(mw: CreditGateMiddleware, probe: Callable[[tuple[Any, ...]], None]) -> None:
    """Call ``probe`` with the arguments of each fixed-cost charge as it is sent: what is
    alive then is alive across the charge's wait."""
    send_charge = mw._send_charge

    def watched_send(*args: Any) -> Any:
        probe(args)
        return send_charge(*args)

    mw._send_charge = watched_send  # type: ignore[method-assign]


@pytest.fixture
async def gate(tmp_path: Path) -> AsyncIterator[CreditGate]:
    data = yaml.safe_load(REFERENCE_YAML)
    prefix = f"cgc{uuid.uuid4().hex[:10]}"
    data.update(redis_url=redis_url(), key_prefix=prefix)
    data["plans"]["enterprise"]["allocations"]["goal_generation"] = 100_000
    data["plans"]["enterprise"]["rate_limits"] = []
    path = tmp_path / "creditgate.yaml"
    path.write_text(yaml.safe_dump(data))
    gate = CreditGate.from_config(path)
    yield gate
    client = gate.redis.client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await gate.close()


async def test_a_fixed_cost_request_leaves_no_reference_cycle(gate: CreditGate) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    await gate.set_plan(org, "enterprise")
    mw = CreditGateMiddleware(bare_app, gate=gate)
    send = Starts()

    for _ in range(20):  # warm-up: templates, caches, the settle task
        await mw(*request(org), send)
    await gate.meter.drain()
    gc.collect()
    gc.disable()
    try:
        for _ in range(REQUESTS):
            await mw(*request(org), send)
        await gate.meter.drain()
        found = gc.collect()
    finally:
        gc.enable()
    assert send.statuses == [200] * (20 + REQUESTS)
    balance = await gate.balance(org)
    assert balance.buckets["goal_generation"].used == 3 * (20 + REQUESTS)  # all charged
    assert found <= AT_MOST, f"{found} objects in reference cycles after {REQUESTS} requests"


async def test_the_apps_scope_is_built_after_the_charge(gate: CreditGate) -> None:
    """While a fixed-cost request waits for its charge's reply, the scope the app will see
    (a dict, its header list and the identity's header tuples) does not exist yet: objects
    alive across that suspension are what the collector's young passes walk, 64 requests
    at a time (BENCHMARKS.md section 1, round 9). The request is then served as before."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    await gate.set_plan(org, "enterprise")
    mw = CreditGateMiddleware(bare_app, gate=gate)  # type: ignore[arg-type]
    seen: list[bool] = []

    def probe(args: tuple[Any, ...]) -> None:
        built = any(
            type(o) is tuple and len(o) == 2 and o[0] == b"x-creditgate-org"
            for o in gc.get_objects()
        )
        seen.append(built)

    watch_charge(mw, probe)
    send = Starts()

    gc.collect()
    gc.disable()  # a pass could untrack a tuple of bytes, hiding it from get_objects
    try:
        scope, receive = request(org)
        await mw(scope, receive, send)
    finally:
        gc.enable()
    assert seen == [False]
    assert send.statuses == [200]
    assert send.headers[0][b"x-tokens-cost"] and b"x-creditgate-request-id" in send.headers[0]


async def test_no_cell_is_alive_while_the_charge_waits(gate: CreditGate) -> None:
    """While a fixed-cost request waits for its charge's reply, the middleware holds no
    closure cells: the app's ``send`` is an object made once admitted (``_ChargedSend``),
    not a closure whose six cells ``__call__`` made as it started (BENCHMARKS.md section 1,
    round 10: each object alive across the wait moves the collector's young passes). The
    response still gets the charge's headers and its status still decides the settle."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    await gate.set_plan(org, "enterprise")
    mw = CreditGateMiddleware(bare_app, gate=gate)  # type: ignore[arg-type]
    cells: list[int] = []

    def probe(args: tuple[Any, ...]) -> None:
        cells.append(sum(type(o).__name__ == "cell" for o in gc.get_objects()))

    watch_charge(mw, probe)
    send = Starts()

    scope, receive = request(org)
    gc.collect()
    gc.freeze()  # what existed before the request is not counted
    gc.disable()
    try:
        await mw(scope, receive, send)
    finally:
        gc.enable()
        gc.unfreeze()
    assert cells == [0]
    assert send.statuses == [200]
    assert (
        send.headers[0][b"x-tokens-cost"] == b"3" and b"x-creditgate-request-id" in send.headers[0]
    )
    await gate.meter.drain()
    balance = await gate.balance(org)
    assert balance.buckets["goal_generation"].used == 3


async def test_no_cleaned_header_list_is_alive_while_the_charge_waits(gate: CreditGate) -> None:
    """The header policy removes a creditgate key from what the app sees; for a fixed-cost
    request that cleaned copy of the header list is built once admitted, not held across
    the charge's wait (BENCHMARKS.md section 1, round 10). The app still never sees the
    key, and gets every other header."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    await gate.set_plan(org, "enterprise")
    seen_by_app: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen_by_app.append(list(scope["headers"]))
        await bare_app(scope, receive, send)

    mw = CreditGateMiddleware(app, gate=gate)  # type: ignore[arg-type]
    scope, receive = request(org)  # the identity from the scope state, as an app's auth says
    key = (b"authorization", b"Bearer cg_" + b"k" * 43)
    scope["headers"].append(key)
    host = scope["headers"][0]
    copies: list[int] = []

    def probe(args: tuple[Any, ...]) -> None:
        copies.append(
            sum(
                type(o) is list and o is not scope["headers"] and any(h is host for h in o)
                for o in gc.get_objects()
            )
        )

    watch_charge(mw, probe)
    send = Starts()

    gc.collect()
    gc.disable()
    try:
        await mw(scope, receive, send)
    finally:
        gc.enable()
    assert copies == [0]
    assert send.statuses == [200]
    names = [name for name, _ in seen_by_app[0]]
    assert b"authorization" not in names
    assert names[:2] == [b"host", b"content-length"] and b"x-creditgate-org" in names


async def test_the_request_id_is_set_once_the_charge_answered(gate: CreditGate) -> None:
    """The request id's context variable is set once the charge answered, not before: its
    new map (two GC-tracked objects) is then not alive across the charge's wait
    (BENCHMARKS.md section 1, round 11). The app, and every log line from the charge's
    answer on, still see it: the same id the response's header carries."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    await gate.set_plan(org, "enterprise")
    seen_by_app: list[str | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen_by_app.append(REQUEST_ID.get())
        await bare_app(scope, receive, send)

    mw = CreditGateMiddleware(app, gate=gate)  # type: ignore[arg-type]
    during: list[str | None] = []
    maps: list[int] = []

    def probe(args: tuple[Any, ...]) -> None:
        during.append(REQUEST_ID.get())
        maps.append(sum(type(o).__name__.startswith("hamt") for o in gc.get_objects()))

    watch_charge(mw, probe)
    send = Starts()

    async def one_request() -> None:
        # A task of its own, as a server runs each request: its context starts empty.
        scope, receive = request(org)
        await mw(scope, receive, send)

    gc.collect()
    gc.freeze()  # what existed before the request is not counted
    gc.disable()
    try:
        await asyncio.get_running_loop().create_task(one_request(), context=Context())
    finally:
        gc.enable()
        gc.unfreeze()
    assert during == [None] and maps == [0]
    assert seen_by_app == [send.headers[0][b"x-creditgate-request-id"].decode()]


async def test_the_seeding_log_line_carries_the_request_id(
    gate: CreditGate, caplog: pytest.LogCaptureFixture
) -> None:
    """An org without state in Redis is seeded during its first charge: the seeding runs
    with the request's id set (Admitter.admit sets it on that path), so what it logs is
    the request's, as when the middleware set the id before the charge."""
    org = f"org-{uuid.uuid4().hex[:8]}"  # never seen: charge.lua answers "missing"
    mw = CreditGateMiddleware(bare_app, gate=gate)
    seed = gate.meter.admission._seed
    ids: list[str | None] = []

    async def watched_seed(org: str) -> None:
        ids.append(REQUEST_ID.get())
        await seed(org)

    gate.meter.admission._seed = watched_seed  # type: ignore[method-assign]
    rids: list[str] = []

    def probe(args: tuple[Any, ...]) -> None:
        rids.append(args[4])  # (org, feature, user, cost, request id, ...)

    watch_charge(mw, probe)
    send = Starts()

    async def one_request() -> None:
        scope, receive = request(org)
        await mw(scope, receive, send)

    await asyncio.get_running_loop().create_task(one_request(), context=Context())
    assert len(send.statuses) == 1  # (the default plan decides the answer; the seeding ran)
    assert len(rids) == 1 and ids == rids


async def test_no_coroutine_of_the_charge_is_alive_while_it_waits(gate: CreditGate) -> None:
    """The fixed-cost request's charge is sent by a plain method and its reply awaited by
    the middleware's own coroutine (Admitter.send_plain, admitted): no coroutine of the
    charge's own is alive across the wait, one object fewer for the collector's young
    passes and one level fewer for the task's resume (BENCHMARKS.md section 1, round 11).
    The request is charged and answered as before, a refusal too."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    await gate.set_plan(org, "enterprise")
    runner = gate.redis.runner
    send_encoded = runner.send_encoded  # type: ignore[attr-defined]
    alive: list[list[str]] = []

    def watched(*args: Any) -> Any:
        alive.append(
            [
                o.__qualname__
                for o in gc.get_objects()
                if type(o).__name__ == "coroutine" and o.__qualname__.startswith("Admitter.")
            ]
        )
        return send_encoded(*args)

    runner.send_encoded = watched  # type: ignore[attr-defined]
    mw = CreditGateMiddleware(bare_app, gate=gate)  # type: ignore[arg-type]
    send = Starts()

    try:
        await mw(*request(org), send)
    finally:
        runner.send_encoded = send_encoded  # type: ignore[attr-defined]
    assert alive == [[]]
    assert send.statuses == [200] and send.headers[0][b"x-tokens-cost"] == b"3"
    await gate.meter.drain()
    balance = await gate.balance(org)
    assert balance.buckets["goal_generation"].used == 3

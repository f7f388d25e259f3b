"""The request/response edges of both modes, tried as an attacker would (issue 7).

Every test runs in middleware mode (the app behind CreditGateMiddleware, in process) and in
proxy mode (the app served by uvicorn behind GatewayApp, itself served by uvicorn), on the
real Redis: the same header policy, the same refund decision and the same answers.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import httpx
import pytest
import yaml
from starlette.types import ASGIApp

from gateway.commands.server import GatewayApp
from gateway.config import Config
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from tests.support.edge_apps import (
    Calls,
    MethodOverride,
    balance,
    edge_config,
    in_middleware_mode,
    in_proxy_mode,
    outcomes,
    target_app,
)
from tests.support.identity_helpers import closed_port
from tests.support.reference import MID_NOVEMBER_MS, REFERENCE_YAML
from tests.support.upstream_app import app as echo_upstream
from tests.support.upstream_app import serve_in_thread

ORG = {"X-Org-Id": "acme", "X-User-Id": "u1"}
KEY = "cg_" + "k" * 43  # shaped like a key; never looked up on unmetered routes


@pytest.fixture(params=["middleware", "proxy"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def serve(
    mode: str, config: Config, app: ASGIApp
) -> AbstractAsyncContextManager[tuple[httpx.AsyncClient, CreditGate]]:
    """``app`` behind creditgate in ``mode``: an HTTP client on it and the metering gate."""
    return (in_middleware_mode if mode == "middleware" else in_proxy_mode)(config, app)


def problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code


# --- the header policy -------------------------------------------------------------------


async def test_method_override_cannot_reach_a_metered_handler_uncharged(
    redisgate: CreditGate, mode: str
) -> None:
    """GET /generate (unmetered) + X-HTTP-Method-Override: POST, behind a method-override
    middleware inside the app, would run the metered POST handler for free."""
    calls = Calls()
    async with serve(mode, edge_config(redisgate.config), MethodOverride(target_app(calls))) as (
        http,
        gate,
    ):
        for header in ("X-HTTP-Method-Override", "x_http_method_override"):
            r = await http.get("/generate", headers={**ORG, header: "POST"})
            assert r.status_code == 405, (header, r.text)
        assert calls.seen == []
        r = await http.post("/generate", headers=ORG)
        assert r.status_code == 200 and r.headers["x-tokens-cost"] == "3"
        assert await outcomes(gate, 1) == [("charge", 200, 3)]
        assert await balance(gate) == 17


SPOOFED = [
    ("X-Creditgate-Org", "victim"),
    ("X_Creditgate_Org", "victim"),
    ("x-creditgate-user", "mallory"),
    ("X-Creditgate-Feature", "free"),
    ("X-Org-Id", "victim"),
    ("X_User_Id", "mallory"),
    ("X-Original-URL", "/generate"),
    ("X-Method-Override", "POST"),
    ("Authorization", f"Bearer {KEY}"),
    ("X-API-Key", KEY),
]
SPOOFED_NAMES = {name.lower() for name, _ in SPOOFED}


async def test_unmetered_requests_never_carry_spoofed_headers(
    redisgate: CreditGate, mode: str
) -> None:
    """curl /anything -H 'X-Creditgate-Org: victim' must not reach an app that trusts it."""
    calls = Calls()
    config = edge_config(redisgate.config, identity={"api_keys": True, "trusted_headers": False})
    async with serve(mode, config, target_app(calls)) as (http, _):
        r = await http.get("/anything", headers=[*SPOOFED, ("X-Trace", "kept")])
        assert r.status_code == 200
        r = await http.post(
            "/anything",
            headers=[("Authorization", "Bearer app-session-token"), ("x-api-key", "app")],
        )
        assert r.status_code == 200
    assert len(calls.seen) == 2
    first, second = (dict((n.lower(), v) for n, v in call["headers"]) for call in calls.seen)
    assert not SPOOFED_NAMES & first.keys(), first
    assert first["x-trace"] == "kept"
    # Credentials that are not creditgate's are the app's: forwarded untouched.
    assert second["authorization"] == "Bearer app-session-token" and second["x-api-key"] == "app"


async def test_trusted_identity_headers_reach_the_app_when_trusted(
    redisgate: CreditGate, mode: str
) -> None:
    calls = Calls()
    async with serve(mode, edge_config(redisgate.config), target_app(calls)) as (http, _):
        r = await http.get("/anything", headers={**ORG, "X-Creditgate-Org": "victim"})
        assert r.status_code == 200
    seen = dict((n.lower(), v) for n, v in calls.seen[0]["headers"])
    assert seen["x-org-id"] == "acme" and "x-creditgate-org" not in seen


@pytest.mark.parametrize("forward", [False, True])
async def test_the_callers_creditgate_key_is_not_forwarded_unless_configured(
    redisgate: CreditGate, pg_dsn: str, mode: str, forward: bool
) -> None:
    calls = Calls()
    config = edge_config(
        redisgate.config, database_url=pg_dsn, forward_credentials=forward,
        identity={"api_keys": True, "trusted_headers": False},
    )  # fmt: skip
    admin = CreditGate(config)
    try:
        await admin.set_plan("acme", "pro")
        _, key = await admin.create_key("acme", user="alice")
    finally:
        await admin.close()
    async with serve(mode, config, target_app(calls)) as (http, gate):
        r = await http.post(
            "/generate", headers=[("Authorization", f"Bearer {key}"), ("X-Org-Id", "victim"),
                                  ("X_Creditgate_Org", "victim")],
        )  # fmt: skip
        assert r.status_code == 200, r.text
        r = await http.post("/generate", headers={"X-API-Key": key})
        assert r.status_code == 200, r.text
        assert await outcomes(gate, 2) == [("charge", 200, 3)] * 2
    by_bearer, by_header = (dict((n.lower(), v) for n, v in c["headers"]) for c in calls.seen)
    assert by_bearer["x-creditgate-org"] == "acme" and by_bearer["x-creditgate-user"] == "alice"
    assert "x-org-id" not in by_bearer and "x_creditgate_org" not in by_bearer
    if forward:
        assert by_bearer["authorization"] == f"Bearer {key}" and by_header["x-api-key"] == key
    else:
        assert "authorization" not in by_bearer and "x-api-key" not in by_header


async def test_two_idempotency_keys_are_refused_before_any_charge(
    redisgate: CreditGate, mode: str
) -> None:
    """The gateway would charge once per one key while the app dedupes on the other."""
    calls = Calls()
    async with serve(mode, edge_config(redisgate.config), target_app(calls)) as (http, gate):
        two = [*ORG.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
        r = await http.post("/generate", headers=two)
        problem(r, 400, "bad_request")
        assert "Idempotency-Key" in r.json()["detail"]
        one = [*ORG.items(), ("Idempotency-Key", "a")]
        assert (await http.post("/generate", headers=one)).status_code == 200
        assert await outcomes(gate, 1) == [("charge", 200, 3)]
        assert await balance(gate) == 17
    assert len(calls.seen) == 1


# --- what the response says it charged ---------------------------------------------------


async def test_refunded_responses_say_nothing_was_charged(redisgate: CreditGate, mode: str) -> None:
    calls = Calls()
    async with serve(mode, edge_config(redisgate.config), target_app(calls)) as (http, gate):
        # Each waits for the one before to settle: a hold not yet refunded is not remaining.
        r = await http.get("/status/503", headers=ORG)
        assert r.status_code == 503
        assert (r.headers["x-tokens-cost"], r.headers["x-tokens-remaining"]) == ("0", "20")
        assert len(await outcomes(gate, 1)) == 1
        r = await http.get("/raise", headers=ORG)
        assert r.status_code == 500
        assert (r.headers["x-tokens-cost"], r.headers["x-tokens-remaining"]) == ("0", "20")
        assert len(await outcomes(gate, 2)) == 2
        r = await http.get("/status/200", headers=ORG)
        assert (r.headers["x-tokens-cost"], r.headers["x-tokens-remaining"]) == ("3", "17")
        assert await outcomes(gate, 3) == [
            ("refund", 503, 0), ("refund", 500, 0), ("charge", 200, 3),
        ]  # fmt: skip
        assert await balance(gate) == 17


@pytest.mark.parametrize(
    ("refund_on", "refunded"),
    [
        (None, {500, 503}),  # the default: 5xx
        (["5xx", 429], {429, 500, 503}),
        (["4xx", "5xx"], {400, 404, 429, 500, 503}),
        ([404], {404, 500, 503}),  # adds to the 5xx, never replaces them
    ],
)
async def test_refund_on_decides_per_feature(
    redisgate: CreditGate, mode: str, refund_on: list[str | int] | None, refunded: set[int]
) -> None:
    statuses = [200, 400, 404, 429, 500, 503]  # at most 6 charges of 3 in 20 tokens
    feature: dict[str, object] = {"cost": 3}
    if refund_on is not None:
        feature["refund_on"] = refund_on
    features = {**yaml.safe_load(REFERENCE_YAML)["features"], "goal_generation": feature}
    config = edge_config(redisgate.config, features=features)
    async with serve(mode, config, target_app(Calls())) as (http, gate):
        for code in statuses:
            r = await http.get(f"/status/{code}", headers=ORG)
            assert r.status_code == code
            assert r.headers["x-tokens-cost"] == ("0" if code in refunded else "3"), code
        got = await outcomes(gate, len(statuses))
    assert got == [("refund" if c in refunded else "charge", c, 0 if c in refunded else 3)
                   for c in statuses]  # fmt: skip
    assert await balance(gate) == 20 - 3 * len(set(statuses) - refunded)


async def test_the_proxys_502_and_504_say_nothing_was_charged(redisgate: CreditGate) -> None:
    routes = [
        {"method": "GET", "path": "/slow", "feature": "goal_generation"},
        {"method": "GET", "path": "/echo/{p:path}", "feature": "goal_generation"},
    ]
    clock = FixedClock(MID_NOVEMBER_MS)
    with serve_in_thread(echo_upstream) as upstream:
        for target, path, status in (
            (f"http://127.0.0.1:{closed_port()}", "/echo/x", 502),
            (upstream, "/slow?delay=2", 504),
        ):
            config = edge_config(
                redisgate.config, upstream=target, routes=routes, upstream_timeout_seconds=0.3
            )
            with serve_in_thread(GatewayApp(CreditGate(config, clock=clock), sync=False)) as url:
                await redisgate.set_plan("acme", "pro")
                async with httpx.AsyncClient(base_url=url) as http:
                    r = await http.get(path, headers=ORG)
                assert r.status_code == status
                assert (r.headers["x-tokens-cost"], r.headers["x-tokens-remaining"]) == ("0", "20")
                assert r.json()["code"] == ("bad_gateway" if status == 502 else "upstream_timeout")
        assert [kind for kind, _, _ in await outcomes(redisgate, 2)] == ["refund", "refund"]
        assert await balance(redisgate) == 20

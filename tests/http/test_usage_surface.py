"""What the AI call cost, on the surface (issue 8 item 6): ``/usage`` rows, ``/stats``
``by_model`` and ``overage``, ``/admin/usage`` by model, the OpenAPI document, and the
Prometheus counters ``creditgate_tokens_by_model_total`` and ``creditgate_usage_missing_total``.

Usage events are XADDed to the org's shard stream in the audit-event format (as settle.lua
writes them, tests/sync/test_usage_fields.py) next to real fixed-cost charges, then one
sync pass moves everything to the ledger.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.core.counters import MAX_MODELS, HotMetrics
from tests.http.test_metrics import ops_client, samples
from tests.support.api_support import ADMIN, PREFIX, Env, auth, make_env
from tests.support.pg import requires_postgres
from tests.support.reference import MID_NOVEMBER_MS
from tests.sync.test_usage_fields import usage_event

pytestmark = requires_postgres


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env():
        yield e


def _events(org: str) -> list[dict[str, str]]:
    """A usage-priced charge with overage, one of another model, a missing-usage charge
    and a refund, all today (no seq: they move no balance snapshot)."""
    common: dict[str, Any] = {
        "ts": MID_NOVEMBER_MS, "s": "", "f": "general_insights", "b": "general_insights",
        "u": "alice", "st": 200, "lat": 30,
    }  # fmt: skip
    return [
        usage_event(org, id="rq-mini", t=17, rs=20, ov=3, mdl="gpt-4o-mini", ui=1200, uc=300,
                    uo=800, ur=0, **common),
        usage_event(org, id="rq-claude", t=9, rs=20, mdl="claude-3-5-sonnet", ui=400, uc=0,
                    uo=100, ur=50, **common),
        usage_event(org, id="rq-missing", t=20, rs=20, cs="policy", um="1", **common),
        usage_event(org, "refund", id="rq-refund", t=0, rs=20, mdl="gpt-4o-mini", ui=10,
                    uo=0, **{**common, "st": 503}),
    ]  # fmt: skip


async def _seed(env: Env) -> str:
    key = await env.key("acme", user="alice")
    assert (await env.gate.charge("acme", "lead_generation", user="alice")).ok  # fixed cost
    redis: Any = env.gate.redis.client
    for e in _events("acme"):
        await redis.xadd(env.gate.keys.shard("acme").events, e)
    await env.sync()
    return key


async def test_usage_rows_carry_what_the_call_cost(env: Env) -> None:
    key = await _seed(env)
    r = await env.http.get(f"{PREFIX}/usage?limit=50", headers=auth(key))
    assert r.status_code == 200, r.text
    rows = {i["event_id"]: i for i in r.json()["items"]}
    cost_fields = ("model", "input_tokens", "cached_input_tokens", "output_tokens",
                   "reasoning_tokens", "reserved", "tokens", "charged", "overage",
                   "cost_source", "usage_missing")  # fmt: skip

    def cost(event_id: str) -> tuple[Any, ...]:
        return tuple(rows[event_id][f] for f in cost_fields)

    assert cost("rq-mini") == ("gpt-4o-mini", 1200, 300, 800, 0, 20, 17, 20, 3, "usage", False)
    assert cost("rq-claude") == ("claude-3-5-sonnet", 400, 0, 100, 50, 20, 9, 9, 0, "usage",
                                 False)  # fmt: skip
    assert cost("rq-missing") == (None, None, None, None, None, 20, 20, 20, 0, "policy", True)
    assert cost("rq-refund") == ("gpt-4o-mini", 10, None, 0, None, 20, 0, 0, 0, "usage", False)
    fixed = next(i for i in rows.values() if i["feature"] == "lead_generation")
    assert tuple(fixed[f] for f in cost_fields) == (
        None, None, None, None, None, None, 5, 5, 0, None, False,
    )  # fmt: skip
    reset = next(i for i in rows.values() if i["kind"] == "reset")
    assert (reset["charged"], reset["overage"], reset["usage_missing"]) == (None, 0, False)


async def test_stats_and_admin_usage_break_usage_down_by_model(env: Env) -> None:
    key = await _seed(env)
    stats = (await env.http.get(f"{PREFIX}/stats?days=7", headers=auth(key))).json()
    assert stats["by_model"] == [  # most (net) tokens first
        {"model": None, "requests": 1, "tokens": 20, "input_tokens": 0,
         "cached_input_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0, "overage": 0,
         "usage_missing_requests": 1},
        {"model": "gpt-4o-mini", "requests": 2, "tokens": 17, "input_tokens": 1210,
         "cached_input_tokens": 300, "output_tokens": 800, "reasoning_tokens": 0, "overage": 3,
         "usage_missing_requests": 0},
        {"model": "claude-3-5-sonnet", "requests": 1, "tokens": 9, "input_tokens": 400,
         "cached_input_tokens": 0, "output_tokens": 100, "reasoning_tokens": 50, "overage": 0,
         "usage_missing_requests": 0},
    ]  # fmt: skip
    assert stats["overage"] == 3
    # The usage-priced requests are in by_feature as before, with their net tokens.
    by_feature = {f["feature"]: (f["requests"], f["tokens"]) for f in stats["by_feature"]}
    assert by_feature == {"general_insights": (4, 46), "lead_generation": (1, 5)}

    admin = (await env.http.get("/admin/usage?days=7&limit=2", headers=ADMIN)).json()
    assert [(m["model"], m["requests"], m["tokens"]) for m in admin["by_model"]] == [
        (None, 1, 20), ("gpt-4o-mini", 2, 17),
    ]  # fmt: skip
    assert admin["overage"] == 3

    # Another org sees none of it.
    other = await env.key("globex")
    stats = (await env.http.get(f"{PREFIX}/stats?days=7", headers=auth(other))).json()
    assert (stats["by_model"], stats["overage"]) == ([], 0)


async def test_the_openapi_document_describes_the_new_fields(env: Env) -> None:
    doc = (await env.http.get(f"{PREFIX}/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    row = schemas["LogRow"]["properties"]
    for name in ("model", "input_tokens", "cached_input_tokens", "output_tokens",
                 "reasoning_tokens", "reserved", "charged", "overage", "cost_source",
                 "usage_missing"):  # fmt: skip
        assert name in row and name in schemas["LogRow"]["required"], name
    assert {"by_model", "overage"} <= set(schemas["Stats"]["properties"])
    assert set(schemas["UsageByModel"]["properties"]) == {
        "model", "requests", "tokens", "input_tokens", "cached_input_tokens", "output_tokens",
        "reasoning_tokens", "overage", "usage_missing_requests",
    }  # fmt: skip


async def test_tokens_by_model_and_missing_usage_counters(env: Env) -> None:
    hot = HotMetrics()
    env.gate.counters = hot
    hot.usage("summarize", "gpt-4o-mini", 12)
    hot.usage("summarize", "gpt-4o-mini", 8)
    hot.usage("summarize", "", 20, missing=True)
    hot.usage("research", "claude-3-5-sonnet", 0, missing=False)
    async with ops_client(env.gate) as client:
        text = (await client.get("/metrics")).text
    got = samples(text)
    by_model = "creditgate_tokens_by_model_total"
    assert got[(by_model, (("feature", "summarize"), ("model", "gpt-4o-mini")))] == 20
    assert got[(by_model, (("feature", "summarize"), ("model", "unknown")))] == 20
    assert got[(by_model, (("feature", "research"), ("model", "claude-3-5-sonnet")))] == 0
    missing = "creditgate_usage_missing_total"
    assert got[(missing, (("feature", "summarize"),))] == 1
    assert (missing, (("feature", "research"),)) not in got
    hot.reset()
    assert hot.tokens_by_model() == {} and hot.usage_missing() == {}


def test_model_series_are_bounded() -> None:
    """Model names come from upstream responses: past MAX_MODELS series, new ones are
    counted under ``other`` (the tokens are never lost)."""
    hot = HotMetrics()
    for i in range(MAX_MODELS + 50):
        hot.usage("f", f"ft:model-{uuid.uuid4().hex}-{i}", 1)
    hot.usage("f", "model-seen-late", 2)
    series = hot.tokens_by_model()
    assert len(series) == MAX_MODELS + 1
    assert series[("f", "other")] == 52
    assert sum(series.values()) == MAX_MODELS + 52


def test_charged_usage_is_count_and_usage() -> None:
    """``charged_usage`` (usage() inlined, the proxy's usage-charged answer) counts exactly
    what ``count(feature, "charged", tokens)`` and ``usage(...)`` count: the same series,
    the bound's ``other``, no model, and missing usage."""
    calls: list[tuple[str, str, int, bool]] = [
        ("f", "gpt-4o", 5, False),
        ("f", "", 3, True),
        ("g", "gpt-4o", 7, False),
        *[("f", f"m-{i}", 1, i % 7 == 0) for i in range(MAX_MODELS + 20)],
        ("f", "gpt-4o", 2, False),
    ]
    one, two = HotMetrics(), HotMetrics()
    for feature, model, tokens, missing in calls:
        one.charged_usage(feature, model, tokens, missing)
        two.count(feature, "charged", tokens)
        two.usage(feature, model, tokens, missing)
    assert one.tokens_by_model() == two.tokens_by_model()
    assert one.usage_missing() == two.usage_missing()
    assert one.requests() == two.requests()
    assert one.tokens_by_model()[("f", "other")] > 0

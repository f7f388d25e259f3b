"""The request's team (contract A10: event field ``tm``) through the sync job into
``ai_token_usage_log.team_id`` (migrations/0007_teams_and_caps.sql).

Events without ``tm`` land exactly as before (``team_id`` NULL); events with it take the
same fast decode path and COPY rendering, with or without the usage fields, and keep their
team on the safe (redelivery) path too. End to end, a gate on Redis and Postgres charges,
refunds and leaves a hold to expire for a key of a team; every request row carries it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.core.events import TEAM_FIELD
from gateway.core.redis_keys import KeySpace
from sync.batch import decode_entries
from sync.records import NO_USAGE, TEAM, Times, canonical, careful_payload, fast_payload
from tests.support.api_support import ADMIN, Env, make_env
from tests.support.caps import BUCKET, caps_overrides
from tests.support.pg import requires_postgres
from tests.sync.test_sync import event, worker, xadd_all
from tests.sync.test_usage_fields import usage_event

pytestmark = requires_postgres


def flat(e: dict[str, str]) -> list[str]:
    return [x for kv in e.items() for x in kv]


def with_team(e: dict[str, str], team: str) -> dict[str, str]:
    """The event as _prelude.lua's audit_event writes it for a request with a team."""
    return {**e, "tm": team}


def test_the_team_field_is_the_event_formats() -> None:
    assert TEAM == TEAM_FIELD == "tm"


def test_entries_with_a_team_take_the_fast_path_and_those_without_are_unchanged() -> None:
    plain = event("acme", "charge", t=3, s=1)
    teamed = with_team(event("acme", "charge", t=3, s=2), "red")
    usage = with_team(usage_event("acme", t=9, rs=12, mdl="gpt-4o-mini", ui=10, s=3), "blue")
    entries = [flat(plain), flat(teamed), flat(usage)]
    rows = decode_entries([(f"1-{i}", e) for i, e in enumerate(entries)], Times()).rows
    # No reference decode: the values Redis returned, as they are.
    assert rows.flats == [e[1::2] for e in entries]
    assert [canonical(e) for e in entries] == [e[1::2] for e in entries]
    assert rows.usage and fast_payload(rows.lines, rows.empty_bucket) is not None
    # The team is the last column; empty (NULL in the fast rendering) without one.
    assert rows.lines[0].endswith(NO_USAGE)
    assert rows.lines[1].endswith(NO_USAGE + "red")
    assert rows.lines[2].endswith("\tusage\t0\tblue")
    careful = careful_payload(rows.flats, Times()).decode().splitlines()
    assert [line.rsplit("\t", 1)[1] for line in careful] == ["\\N", "red", "blue"]
    # As a mapping (redis-py's reply) too.
    assert canonical(teamed) == flat(teamed)[1::2]


async def team_rows(pool: asyncpg.Pool) -> dict[str, str | None]:
    rows = await pool.fetch("SELECT event_id, team_id FROM ai_token_usage_log")
    return {r["event_id"]: r["team_id"] for r in rows}


async def test_events_land_with_their_team_once_on_the_fast_and_the_safe_path(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    events = []
    for i in range(60):
        e = (
            usage_event("acme", t=4, rs=5, mdl="gpt-4o-mini", s=i + 1)
            if i % 3 == 0
            else event("acme", "charge", t=3, s=i + 1)
        )
        events.append(with_team(e, f"team-{i % 4}") if i % 2 else e)
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace)
    result = await w.run_once()
    assert result.inserted == len(events) and result.fallbacks == 0
    expected = {e["id"]: e.get("tm") for e in events}
    assert await team_rows(pool) == expected
    assert sum(v is not None for v in expected.values()) == 30
    # Delivered again among new ones: the safe path keeps the team, nothing doubles.
    more = [with_team(event("acme", "refund", t=0, s=100 + i), "red") for i in range(5)]
    await xadd_all(redis, keyspace, events[:10] + more)
    again = await w.run_once()
    assert (again.inserted, again.duplicates) == (5, 10)
    assert await team_rows(pool) == {**expected, **{e["id"]: "red" for e in more}}
    await w.close()


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env(**caps_overrides()):
        yield e


async def test_a_teams_requests_carry_it_into_the_ledger(env: Env) -> None:
    """Through the gate and the real sync job: charge, refund and expired hold rows of a
    key of team red carry ``red``; a key without a team and non-request rows carry NULL."""
    gate = env.gate
    await env.http.put("/admin/orgs/acme", json={"plan": "teams"}, headers=ADMIN)
    r = await env.http.put("/admin/orgs/acme/teams/red", json={"caps": {BUCKET: 60}}, headers=ADMIN)
    assert r.status_code == 201
    red = (await env.http.post("/admin/keys", json={"org": "acme", "team": "red"},
                               headers=ADMIN)).json()["id"]  # fmt: skip
    loose = (await env.http.post("/admin/keys", json={"org": "acme"}, headers=ADMIN)).json()["id"]
    charged = await gate.charge("acme", BUCKET, user="u1", key_id=red)
    refunded = await gate.meter.admit("acme", BUCKET, user="u1", key_id=red)
    await gate.meter.settle(refunded, ok=False, status=500, latency_ms=1)
    plain = await gate.charge("acme", BUCKET, user="u2", key_id=loose)
    # A request naming its team itself (a JWT claim, the middleware scope).
    claimed = await gate.charge("acme", BUCKET, user="u3", team="red")
    # A hold left open (a crashed gateway): the sync job sweeps it into a charge.
    left = await gate.meter.admit("acme", BUCKET, user="u1", key_id=red)
    assert all(a.ok for a in (charged, refunded, plain, claimed, left))
    await env.sync()
    store = await gate.require_store()
    rows = await store.pool.fetch(
        "SELECT request_id, kind, team_id FROM ai_token_usage_log"
        " WHERE organization_id = 'acme' ORDER BY seq"
    )
    request_kinds = {"charge", "refund", "expired_hold"}
    by_request = {
        (r["request_id"], r["kind"]): r["team_id"] for r in rows if r["kind"] in request_kinds
    }
    assert by_request == {
        (charged.request_id, "charge"): "red",
        (refunded.request_id, "refund"): "red",
        (plain.request_id, "charge"): None,
        (claimed.request_id, "charge"): "red",
        (left.request_id, "expired_hold"): "red",
    }
    # Rows of no request (the plan change, the period's lazy reset) have no team.
    others = [r for r in rows if r["kind"] not in request_kinds]
    assert {r["kind"] for r in others} >= {"plan_change"}
    assert {r["team_id"] for r in others} == {None}

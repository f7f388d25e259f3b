"""``GET /stats?group=team|user`` (contract A10) on real Redis and Postgres: requests
charged through keys of teams, synced into the log, then broken down per team and per
user; another org's usage never shows; a bad group is 400."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.support.api_support import ADMIN, PREFIX, Env, auth, make_env, problem
from tests.support.caps import BUCKET, caps_overrides
from tests.support.pg import requires_postgres

pytestmark = requires_postgres


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env(**caps_overrides()):
        yield e


async def _key(env: Env, org: str, **body: Any) -> str:
    r = await env.http.post("/admin/keys", json={"org": org, **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


async def _deduct(env: Env, key: str, times: int, user: str | None = None) -> None:
    body: dict[str, Any] = {"feature": BUCKET}
    if user is not None:
        body["user_id"] = user
    for _ in range(times):
        r = await env.http.post(f"{PREFIX}/deduct", json=body, headers=auth(key))
        assert r.status_code == 200, r.text


async def _stats(env: Env, key: str, query: str) -> dict[str, Any]:
    r = await env.http.get(f"{PREFIX}/stats?{query}", headers=auth(key))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_stats_grouped_by_team_and_user(env: Env) -> None:
    for org in ("acme", "globex"):
        r = await env.http.put(f"/admin/orgs/{org}", json={"plan": "teams"}, headers=ADMIN)
        assert r.status_code == 201
    for team in ("red", "blue"):
        r = await env.http.put(f"/admin/orgs/acme/teams/{team}", json={}, headers=ADMIN)
        assert r.status_code == 201
    # globex has a team called red too: its usage must never show in acme's figures.
    await env.http.put("/admin/orgs/globex/teams/red", json={}, headers=ADMIN)
    red = await _key(env, "acme", user="alice", team="red")
    blue = await _key(env, "acme", user="bob", team="blue")
    loose = await _key(env, "acme")  # an org key: no team, names users freely
    other = await _key(env, "globex", user="alice", team="red")
    env.clock.set(int(datetime(2026, 11, 10, 9, tzinfo=UTC).timestamp() * 1000))
    await _deduct(env, red, 3)  # 9 tokens (cost 3), an earlier day of the window
    env.clock.set(int(datetime(2026, 11, 15, 9, tzinfo=UTC).timestamp() * 1000))
    await _deduct(env, blue, 2)
    await _deduct(env, loose, 1, user="carol")
    await _deduct(env, loose, 1)
    await _deduct(env, other, 5)
    await env.sync()

    by_team = await _stats(env, red, "group=team")
    assert by_team["group"] == "team"
    assert by_team["by_group"] == [
        {"id": "red", "requests": 3, "tokens": 9},
        {"id": "blue", "requests": 2, "tokens": 6},
        {"id": None, "requests": 2, "tokens": 6},
    ]
    # The groups add up to the window's total, as the rollups count it.
    assert sum(g["tokens"] for g in by_team["by_group"]) == sum(
        d["tokens"] for d in by_team["by_day"]
    )
    by_user = await _stats(env, blue, "group=user&days=30")
    assert by_user["by_group"] == [
        {"id": "alice", "requests": 3, "tokens": 9},
        {"id": "bob", "requests": 2, "tokens": 6},
        {"id": "carol", "requests": 1, "tokens": 3},
        {"id": None, "requests": 1, "tokens": 3},
    ]
    # The window applies: a one-day window leaves out the 10th.
    today = await _stats(env, red, "group=team&days=1")
    assert [g["id"] for g in today["by_group"]] == ["blue", None]
    # globex sees its own team red only.
    theirs = await _stats(env, other, "group=team")
    assert theirs["by_group"] == [{"id": "red", "requests": 5, "tokens": 15}]
    # Without group: no breakdown; a bad group is a 400 naming the parameter.
    plain = await _stats(env, red, "")
    assert plain["group"] is None and plain["by_group"] is None
    r = await env.http.get(f"{PREFIX}/stats?group=org", headers=auth(red))
    assert "group" in problem(r, 400, "bad_request")["detail"]

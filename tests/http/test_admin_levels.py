"""The admin API of teams, users and keys' caps (contract A10) on the real Redis and a
throwaway Postgres with migration 0007: happy paths, validation, org isolation on every
route, and a key moved to another team charged against it at once on another process."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.core.periods import FixedClock
from gateway.http.app import build_ops_app
from gateway.metering.gate import CreditGate
from tests.support.api_support import (
    ADMIN,
    ADMIN_TOKEN,
    PREFIX,
    REDIS,
    Env,
    auth,
    clean_prefix,
    make_env,
    problem,
)
from tests.support.caps import BUCKET, caps_overrides, level_used
from tests.support.pg import requires_postgres, temp_database
from tests.support.reference import MID_NOVEMBER_MS, reference_config

pytestmark = requires_postgres


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env(**caps_overrides()):
        yield e


async def org(env: Env, name: str, plan: str = "teams") -> None:
    r = await env.http.put(f"/admin/orgs/{name}", json={"plan": plan}, headers=ADMIN)
    assert r.status_code in (200, 201), r.text


async def put_team(env: Env, o: str, team: str, **body: Any) -> httpx.Response:
    return await env.http.put(f"/admin/orgs/{o}/teams/{team}", json=body, headers=ADMIN)


async def teams(env: Env, o: str) -> list[dict[str, Any]]:
    r = await env.http.get(f"/admin/orgs/{o}/teams", headers=ADMIN)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def new_key(env: Env, o: str, **body: Any) -> dict[str, Any]:
    r = await env.http.post("/admin/keys", json={"org": o, **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def deduct(http: httpx.AsyncClient, key: str) -> httpx.Response:
    return await http.post(f"{PREFIX}/deduct", json={"feature": BUCKET}, headers=auth(key))


async def test_team_put_list_update_and_delete(env: Env) -> None:
    await org(env, "acme")
    r = await put_team(env, "acme", "red", name="Red team", caps={BUCKET: "60%", "research": 9})
    assert r.status_code == 201
    assert r.json() == {
        "org": "acme", "team": "red", "name": "Red team",
        "caps": {BUCKET: "60%", "research": 9}, "users": 0, "keys": 0, "created": True,
    }  # fmt: skip
    # An update merges: absent members stay, null clears one bucket's override.
    r = await put_team(env, "acme", "red", caps={"research": None, BUCKET: 12})
    assert r.status_code == 200
    body = r.json()
    assert (body["name"], body["caps"], body["created"]) == ("Red team", {BUCKET: 12}, False)
    await put_team(env, "acme", "blue")
    await env.http.put("/admin/orgs/acme/users/u1", json={"team": "red"}, headers=ADMIN)
    await new_key(env, "acme", team="red")
    listed = await teams(env, "acme")
    assert [(t["team"], t["users"], t["keys"]) for t in listed] == [
        ("blue", 0, 0), ("red", 1, 1),
    ]  # fmt: skip
    assert listed[1]["caps"] == {BUCKET: 12} and listed[0]["caps"] == {}
    # The cap is mirrored into Redis: the team's members are charged against it.
    key = (await new_key(env, "acme", user="u1"))["key"]
    for _ in range(4):
        assert (await deduct(env.http, key)).status_code == 200
    refused = problem(await deduct(env.http, key), 402, "insufficient_tokens")
    assert (refused["level"], refused["cap"], refused["used"]) == ("team", 12, 12)
    # Deleting it leaves its members teamless, in Postgres and in Redis.
    assert (await env.http.delete("/admin/orgs/acme/teams/red", headers=ADMIN)).status_code == 204
    assert [t["team"] for t in await teams(env, "acme")] == ["blue"]
    assert (await deduct(env.http, key)).status_code == 200
    store = await env.gate.require_store()
    assert await store.pool.fetchval(
        "SELECT team_id FROM org_users WHERE organization_id = 'acme' AND user_id = 'u1'"
    ) is None  # fmt: skip
    assert await store.pool.fetchval(
        "SELECT count(*) FROM api_keys WHERE organization_id = 'acme' AND team_id IS NOT NULL"
    ) == 0  # fmt: skip
    r = await env.http.delete("/admin/orgs/acme/teams/red", headers=ADMIN)
    problem(r, 404, "unknown_team")


async def test_user_team_and_caps(env: Env) -> None:
    await org(env, "acme")
    await put_team(env, "acme", "red", caps={BUCKET: 60})
    r = await env.http.put(
        "/admin/orgs/acme/users/alice", json={"team": "red", "caps": {BUCKET: 6}}, headers=ADMIN
    )
    assert r.status_code == 200
    assert r.json() == {"org": "acme", "user": "alice", "team": "red", "caps": {BUCKET: 6}}
    # Absent team: unchanged; null: out of the team.
    r = await env.http.put(
        "/admin/orgs/acme/users/alice", json={"caps": {"research": "50%"}}, headers=ADMIN
    )
    assert r.json()["team"] == "red" and r.json()["caps"] == {BUCKET: 6, "research": "50%"}
    key = (await new_key(env, "acme", user="alice"))["key"]
    balance = (await env.http.get(f"{PREFIX}/balance", headers=auth(key))).json()
    by_level = {lv["level"]: lv for lv in balance["levels"]}
    assert by_level["team"]["id"] == "red"
    assert by_level["user"]["buckets"][BUCKET] == {"cap": 6, "used": 0, "remaining": 6}
    assert by_level["user"]["buckets"]["research"]["cap"] == 50
    assert (await deduct(env.http, key)).status_code == 200
    assert (await deduct(env.http, key)).status_code == 200
    refused = problem(await deduct(env.http, key), 402, "insufficient_tokens")
    assert (refused["level"], refused["cap"]) == ("user", 6)
    r = await env.http.put("/admin/orgs/acme/users/alice", json={"team": None}, headers=ADMIN)
    assert r.json()["team"] is None and r.json()["caps"] == {BUCKET: 6, "research": "50%"}
    # Only capped levels count: red drew 6 while alice was in it, nothing since.
    assert (await env.http.put("/admin/orgs/acme/users/alice", json={"caps": {BUCKET: None}},
                               headers=ADMIN)).json()["caps"] == {"research": "50%"}  # fmt: skip
    assert (await deduct(env.http, key)).status_code == 200
    assert await level_used(env.gate, "acme", "team", "red") == 6


async def test_key_created_in_a_team_with_caps_and_patched(env: Env) -> None:
    await org(env, "acme")
    await put_team(env, "acme", "red", caps={BUCKET: 30})
    await put_team(env, "acme", "blue", caps={BUCKET: 3})
    created = await new_key(env, "acme", user="bob", team="red", caps={BUCKET: "9%"})
    assert (created["team"], created["caps"]) == ("red", {BUCKET: "9%"})
    listed = (await env.http.get("/admin/keys?org=acme", headers=ADMIN)).json()["items"]
    assert listed[0]["id"] == created["id"]
    key, kid = created["key"], created["id"]
    for _ in range(3):
        assert (await deduct(env.http, key)).status_code == 200
    refused = problem(await deduct(env.http, key), 402, "insufficient_tokens")
    assert (refused["level"], refused["cap"]) == ("key", 9)
    r = await env.http.patch(f"/admin/keys/{kid}", json={"caps": {BUCKET: None}}, headers=ADMIN)
    assert r.status_code == 200
    assert r.json() == {"id": kid, "org": "acme", "user": "bob", "team": "red", "caps": {}}
    assert (await deduct(env.http, key)).status_code == 200
    assert await level_used(env.gate, "acme", "team", "red") == 12
    r = await env.http.patch(f"/admin/keys/{kid}", json={"team": "blue"}, headers=ADMIN)
    assert r.json()["team"] == "blue"
    assert (await deduct(env.http, key)).status_code == 200
    refused = problem(await deduct(env.http, key), 402, "insufficient_tokens")
    assert (refused["level"], refused["cap"]) == ("team", 3)
    r = await env.http.patch(f"/admin/keys/{kid}", json={"team": None}, headers=ADMIN)
    assert r.json()["team"] is None
    assert (await deduct(env.http, key)).status_code == 200
    assert await level_used(env.gate, "acme", "team", "blue") == 3
    assert await level_used(env.gate, "acme", "team", "red") == 12


async def test_validation_errors(env: Env) -> None:
    await org(env, "acme")
    bad_caps: list[Any] = [{"nope": 3}, {BUCKET: "150%"}, {BUCKET: -1}, {BUCKET: True},
                           {BUCKET: "lots"}, {BUCKET: "1.234%"}]  # fmt: skip
    for caps in bad_caps:
        body = problem(await put_team(env, "acme", "red", caps=caps), 422, "invalid_request")
        assert "caps" in str(body), body
        problem(
            await env.http.put("/admin/orgs/acme/users/u", json={"caps": caps}, headers=ADMIN),
            422, "invalid_request",
        )  # fmt: skip
        problem(
            await env.http.post("/admin/keys", json={"org": "acme", "caps": caps}, headers=ADMIN),
            422, "invalid_request",
        )  # fmt: skip
    assert await teams(env, "acme") == []
    # Nothing was created by a refused request: no user row, no key.
    store = await env.gate.require_store()
    assert await store.pool.fetchval("SELECT count(*) FROM org_users") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM api_keys") == 0
    problem(await put_team(env, "acme", "a b"), 422, "invalid_request")
    problem(await put_team(env, "acme", "red", name=7), 422, "invalid_request")
    # Unknown members are ignored, as on every route of the API.
    assert (await put_team(env, "acme", "red", colour="red")).status_code == 201
    r = await env.http.put("/admin/orgs/acme/teams/red", content=b"{", headers=ADMIN)
    problem(r, 400, "bad_request")
    # Unknown orgs and teams.
    problem(await put_team(env, "nobody", "red"), 404, "unknown_org")
    problem(await env.http.get("/admin/orgs/nobody/teams", headers=ADMIN), 404, "unknown_org")
    problem(await env.http.delete("/admin/orgs/nobody/teams/red", headers=ADMIN),
            404, "unknown_org")  # fmt: skip
    r = await env.http.put("/admin/orgs/nobody/users/u", json={}, headers=ADMIN)
    problem(r, 404, "unknown_org")
    r = await env.http.put("/admin/orgs/acme/users/u", json={"team": "ghost"}, headers=ADMIN)
    problem(r, 422, "unknown_team")
    r = await env.http.post("/admin/keys", json={"org": "acme", "team": "ghost"}, headers=ADMIN)
    problem(r, 422, "unknown_team")
    assert await store.pool.fetchval("SELECT count(*) FROM api_keys") == 0
    kid = (await new_key(env, "acme"))["id"]
    r = await env.http.patch(f"/admin/keys/{kid}", json={"team": "ghost"}, headers=ADMIN)
    problem(r, 422, "unknown_team")
    r = await env.http.patch("/admin/keys/key_missing", json={"team": None}, headers=ADMIN)
    problem(r, 404, "unknown_key")
    r = await env.http.patch(f"/admin/keys/{kid}", json={"caps": {BUCKET: "x"}}, headers=ADMIN)
    problem(r, 422, "invalid_request")
    # Every route wants the admin token.
    routes = [("PUT", "/admin/orgs/acme/teams/red"), ("GET", "/admin/orgs/acme/teams"),
              ("DELETE", "/admin/orgs/acme/teams/red"), ("PUT", "/admin/orgs/acme/users/u"),
              ("PATCH", f"/admin/keys/{kid}")]  # fmt: skip
    for method, path in routes:
        problem(await env.http.request(method, path, json={}), 401, "unauthenticated")


async def test_org_isolation_on_every_route(env: Env) -> None:
    await org(env, "acme")
    await org(env, "globex")
    await put_team(env, "globex", "ops", caps={BUCKET: 6})
    await put_team(env, "acme", "red", caps={BUCKET: 30})
    # The same team id in two orgs: two teams.
    r = await put_team(env, "acme", "shared", name="acme's", caps={BUCKET: 30})
    assert r.json()["created"] is True
    r = await put_team(env, "globex", "shared", name="globex's", caps={BUCKET: 3})
    assert r.json()["created"] is True
    assert [(t["team"], t["name"]) for t in await teams(env, "acme")] == [
        ("red", ""), ("shared", "acme's"),
    ]  # fmt: skip
    assert [(t["team"], t["name"], t["caps"]) for t in await teams(env, "globex")] == [
        ("ops", "", {BUCKET: 6}), ("shared", "globex's", {BUCKET: 3}),
    ]  # fmt: skip
    # A user or key of acme cannot join globex's team.
    r = await env.http.put("/admin/orgs/acme/users/u", json={"team": "ops"}, headers=ADMIN)
    problem(r, 422, "unknown_team")
    r = await env.http.post("/admin/keys", json={"org": "acme", "team": "ops"}, headers=ADMIN)
    problem(r, 422, "unknown_team")
    acme_key = await new_key(env, "acme", user="u", team="red")
    r = await env.http.patch(f"/admin/keys/{acme_key['id']}", json={"team": "ops"}, headers=ADMIN)
    problem(r, 422, "unknown_team")
    # The key is still in acme's red team, in Postgres and on the next request.
    store = await env.gate.require_store()
    assert await store.pool.fetchval(
        "SELECT team_id FROM api_keys WHERE id = $1", acme_key["id"]
    ) == "red"  # fmt: skip
    # Moving the key into "shared" picks acme's team (cap 30), never globex's (cap 3).
    r = await env.http.patch(
        f"/admin/keys/{acme_key['id']}", json={"team": "shared"}, headers=ADMIN
    )
    assert (r.json()["org"], r.json()["team"]) == ("acme", "shared")
    for _ in range(2):
        assert (await deduct(env.http, acme_key["key"])).status_code == 200
    assert await level_used(env.gate, "acme", "team", "shared") == 6
    assert await level_used(env.gate, "globex", "team", "shared") == 0
    # Deleting acme's "shared" or a team only globex has leaves globex's alone.
    problem(await env.http.delete("/admin/orgs/acme/teams/ops", headers=ADMIN), 404,
            "unknown_team")  # fmt: skip
    assert (
        await env.http.delete("/admin/orgs/acme/teams/shared", headers=ADMIN)
    ).status_code == 204
    assert [t["team"] for t in await teams(env, "globex")] == ["ops", "shared"]
    # globex's listing counts only its own members.
    await env.http.put("/admin/orgs/globex/users/u", json={"team": "ops"}, headers=ADMIN)
    assert [(t["users"], t["keys"]) for t in await teams(env, "globex")] == [(1, 0), (0, 0)]
    assert [(t["team"], t["users"], t["keys"]) for t in await teams(env, "acme")] == [
        ("red", 0, 0),
    ]  # fmt: skip
    # A user of the same id in each org has its own team.
    r = await env.http.put("/admin/orgs/acme/users/u", json={"team": "red"}, headers=ADMIN)
    assert r.json()["team"] == "red"
    assert await store.pool.fetchval(
        "SELECT team_id FROM org_users WHERE organization_id = 'globex' AND user_id = 'u'"
    ) == "ops"  # fmt: skip


async def test_a_moved_key_is_charged_against_its_new_team_at_once_on_every_process() -> None:
    """Two gates (two processes' worth: own connections, own key caches) share Redis and
    Postgres; a PATCH through one applies to the very next request through the other."""
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    async with temp_database(migrated=True) as dsn:
        settings: dict[str, Any] = {
            "redis_url": REDIS, "key_prefix": prefix, "database_url": dsn,
            "admin_token": ADMIN_TOKEN,
            # A long key cache: the move must not depend on it expiring.
            "identity": {"api_keys": True, "trusted_headers": False, "key_cache_seconds": 600},
            **caps_overrides(),
        }  # fmt: skip
        clock = FixedClock(MID_NOVEMBER_MS)
        gates = [CreditGate(reference_config(**settings), clock=clock) for _ in range(2)]
        clients = [
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=build_ops_app(g)), base_url="http://cg.test"
            )
            for g in gates
        ]
        one, two = clients
        try:
            await one.put("/admin/orgs/acme", json={"plan": "teams"}, headers=ADMIN)
            for team, cap in (("red", 30), ("blue", 3)):
                r = await one.put(f"/admin/orgs/acme/teams/{team}", json={"caps": {BUCKET: cap}},
                                  headers=ADMIN)  # fmt: skip
                assert r.status_code == 201
            r = await one.post("/admin/keys", json={"org": "acme", "team": "red"}, headers=ADMIN)
            key, kid = r.json()["key"], r.json()["id"]
            # Process two has the key cached, charged against red.
            assert (await deduct(two, key)).status_code == 200
            assert await level_used(gates[1], "acme", "team", "red") == 3
            r = await one.patch(f"/admin/keys/{kid}", json={"team": "blue"}, headers=ADMIN)
            assert r.status_code == 200 and r.json()["team"] == "blue"
            assert (await deduct(two, key)).status_code == 200
            assert await level_used(gates[1], "acme", "team", "blue") == 3
            assert await level_used(gates[1], "acme", "team", "red") == 3
            refused = problem(await deduct(two, key), 402, "insufficient_tokens")
            assert (refused["level"], refused["level_id"], refused["cap"]) == ("team", "blue", 3)
            # And back through process two: process one charges red again at once.
            r = await two.patch(f"/admin/keys/{kid}", json={"team": "red"}, headers=ADMIN)
            assert r.json()["team"] == "red"
            assert (await deduct(one, key)).status_code == 200
            assert await level_used(gates[0], "acme", "team", "red") == 6
        finally:
            for c in clients:
                await c.aclose()
            for g in gates:
                await g.close()
            await clean_prefix(prefix)

# ruff: noqa: E501  (recorded response bodies are kept on one line each)
"""The exact bytes the token and admin APIs answer (contract A4).

One deterministic scenario (fixed clock, fresh database) walks every JSON endpoint and a
sample of refusals; each answer's status, content type and body text must equal what the
hand-written handlers answered before the pydantic models (recorded below). Issue 8 added
fields on purpose, after every field recorded before: each ``/usage`` row ends with what
the call cost (``model`` ... ``usage_missing``, null/0/false on fixed-cost rows, and
``charged``), ``/stats`` and ``/admin/usage`` end with ``by_model`` and ``overage``. Issue 9
(contract A10) added, after them too: ``team`` and ``caps`` of a key, ``levels`` of
``/balance``, ``level``/``remaining`` of an ``insufficient_tokens`` refusal, and ``group``
and ``by_group`` of ``/stats`` (null without ``?group=``); then issue 8's ``overage`` of
each bucket of ``/balance`` and ``/admin/orgs/{org}``, last in the bucket. Values that
differ from run to run (random ids, keys, Postgres ``now()``) are masked first; key order,
number formatting and every other byte are compared.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from tests.support.api_support import ADMIN, PREFIX, Env, auth, make_env
from tests.support.pg import requires_postgres

pytestmark = requires_postgres

_VOLATILE = re.compile(
    r'"(request_id|id|key|prefix|created_at|revoked_at|next_cursor|event_id)":"[^"]*"'
)
_SERIAL = re.compile(r'"id":\d+')
_KEY_ID = re.compile(r"key_[0-9a-f]{16}")


def _mask(text: str) -> str:
    text = _VOLATILE.sub(lambda m: f'"{m.group(1)}":"*"', text)
    return _KEY_ID.sub("key_*", _SERIAL.sub('"id":0', text))


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env():
        yield e


async def _walk(env: Env) -> list[tuple[str, int, str, str]]:
    """(label, status, content type, masked body) of every call of the scenario."""
    out: list[tuple[str, int, str, str]] = []
    http = env.http

    async def call(label: str, method: str, path: str, **kw: object) -> str:
        r = await http.request(method, path, **kw)  # type: ignore[arg-type]
        out.append((label, r.status_code, r.headers.get("content-type", ""), _mask(r.text)))
        return r.text

    await call("put_org_new", "PUT", "/admin/orgs/acme", json={"plan": "pro"}, headers=ADMIN)
    await call("put_org_change", "PUT", "/admin/orgs/acme", json={"plan": "pro"}, headers=ADMIN)
    await call("put_org_bad", "PUT", "/admin/orgs/a%20b", json={"plan": "x"}, headers=ADMIN)
    created = await call(
        "post_key", "POST", "/admin/keys", json={"org": "acme", "name": "ci"}, headers=ADMIN
    )
    key = created.split('"key":"')[1].split('"')[0]
    await call("post_key_bad", "POST", "/admin/keys", json={"org": 5, "user": ""}, headers=ADMIN)
    await call("list_keys", "GET", "/admin/keys?org=acme", headers=ADMIN)
    await call("list_keys_bad", "GET", "/admin/keys", headers=ADMIN)
    grant = {"bucket": "goal_generation", "amount": 10, "reference": "r-1"}
    url = "/admin/orgs/acme/grants"
    await call("grant_new", "POST", url, json=grant, headers=ADMIN)
    await call("grant_again", "POST", url, json=grant, headers=ADMIN)
    await call("grant_bad", "POST", url, json={"bucket": "gold", "amount": "5"}, headers=ADMIN)
    await call("grant_unknown_org", "POST", "/admin/orgs/nobody/grants", json=grant,
               headers=ADMIN)  # fmt: skip
    h = auth(key)
    await call("balance", "GET", f"{PREFIX}/balance", headers=h)
    await call("check", "POST", f"{PREFIX}/check", json={"feature": "goal_generation"}, headers=h)
    await call("check_refused", "POST", f"{PREFIX}/check",
               json={"feature": "goal_generation", "quantity": 11}, headers=h)  # fmt: skip
    await call("check_invalid", "POST", f"{PREFIX}/check", json={"feature": 5, "quantity": 0},
               headers=h)  # fmt: skip
    await call("check_unknown", "POST", f"{PREFIX}/check", json={"feature": "nope"}, headers=h)
    await call("check_not_json", "POST", f"{PREFIX}/check", content=b"{", headers=h)
    deduct = {"feature": "goal_generation", "user_id": "alice"}
    await call("deduct", "POST", f"{PREFIX}/deduct", json=deduct,
               headers={**h, "Idempotency-Key": "k1"})  # fmt: skip
    await call("deduct_replay", "POST", f"{PREFIX}/deduct", json=deduct,
               headers={**h, "Idempotency-Key": "k1"})  # fmt: skip
    await call("deduct_refused", "POST", f"{PREFIX}/deduct",
               json={"feature": "goal_generation", "quantity": 20}, headers=h)  # fmt: skip
    await call("deduct_invalid", "POST", f"{PREFIX}/deduct",
               json={"feature": "goal_generation", "user_id": "b o b", "idempotency_key": ""},
               headers={**h, "Idempotency-Key": "x"})  # fmt: skip
    await env.gate.charge("acme", "lead_generation", user="bob")
    await env.sync()
    await call("stats", "GET", f"{PREFIX}/stats?days=2", headers=h)
    await call("stats_bad", "GET", f"{PREFIX}/stats?days=abc", headers=h)
    await call("usage", "GET", f"{PREFIX}/usage?limit=2", headers=h)
    await call("usage_bad", "GET", f"{PREFIX}/usage?cursor=zzz", headers=h)
    await call("unauthenticated", "GET", f"{PREFIX}/balance")
    await call("get_org", "GET", "/admin/orgs/acme", headers=ADMIN)
    await call("get_org_unknown", "GET", "/admin/orgs/nobody", headers=ADMIN)
    await call("orgs_spend", "GET", "/admin/orgs", headers=ADMIN)
    await call("orgs_id", "GET", "/admin/orgs?sort=id&limit=5", headers=ADMIN)
    await call("orgs_bad", "GET", "/admin/orgs?sort=name", headers=ADMIN)
    await call("usage_window", "GET", "/admin/usage?days=2&limit=3", headers=ADMIN)
    await call("usage_window_bad", "GET", "/admin/usage?from=2026-11-16&to=2026-11-15",
               headers=ADMIN)  # fmt: skip
    await call("admin_unauthenticated", "GET", "/admin/orgs")
    key_id = _KEY_ID.search(created)
    assert key_id is not None
    await call("delete_key", "DELETE", f"/admin/keys/{key_id.group(0)}", headers=ADMIN)
    await call("delete_key_unknown", "DELETE", "/admin/keys/key_nope", headers=ADMIN)
    await call("not_found", "GET", f"{PREFIX}/nope")
    await call("method_not_allowed", "GET", f"{PREFIX}/deduct")
    return out


JSON = "application/json"
PROBLEM = "application/problem+json"

RECORDED: list[tuple[str, int, str, str]] = [
    ('put_org_new', 201, JSON, '{"org":"acme","plan":"pro","previous_plan":null,"created":true,"period_anchor":null}'),
    ('put_org_change', 200, JSON, '{"org":"acme","plan":"pro","previous_plan":"pro","created":false,"period_anchor":null}'),
    ('put_org_bad', 422, PROBLEM, '{"type":"https://creditgate.dev/problems/invalid_request","title":"Invalid request","status":422,"detail":"org: must be 1-200 printable ASCII characters without spaces","code":"invalid_request","errors":[{"field":"org","message":"must be 1-200 printable ASCII characters without spaces"}]}'),
    ('post_key', 201, JSON, '{"id":"*","org":"acme","user":null,"name":"ci","prefix":"*","created_at":"*","revoked_at":null,"key":"*","team":null,"caps":{}}'),
    ('post_key_bad', 422, PROBLEM, '{"type":"https://creditgate.dev/problems/invalid_request","title":"Invalid request","status":422,"detail":"org: must be a string; user: must be 1-200 printable ASCII characters without spaces","code":"invalid_request","errors":[{"field":"org","message":"must be a string"},{"field":"user","message":"must be 1-200 printable ASCII characters without spaces"}]}'),
    ('list_keys', 200, JSON, '{"items":[{"id":"*","org":"acme","user":null,"name":"ci","prefix":"*","created_at":"*","revoked_at":null,"team":null,"caps":{}}]}'),
    ('list_keys_bad', 400, PROBLEM, '{"type":"https://creditgate.dev/problems/bad_request","title":"Bad request","status":400,"detail":"org is required (an org id)","code":"bad_request"}'),
    ('grant_new', 201, JSON, '{"id":0,"org":"acme","bucket":"goal_generation","amount":10,"reference":"r-1","expires_at":null,"created_at":"*","created":true}'),
    ('grant_again', 200, JSON, '{"id":0,"org":"acme","bucket":"goal_generation","amount":10,"reference":"r-1","expires_at":null,"created_at":"*","created":false}'),
    ('grant_bad', 422, PROBLEM, '{"type":"https://creditgate.dev/problems/invalid_request","title":"Invalid request","status":422,"detail":"amount: must be an integer; reference: is required; bucket: unknown bucket (known: general_insights, goal_generation, lead_generation, revenue_forecast, strategy_analysis)","code":"invalid_request","errors":[{"field":"amount","message":"must be an integer"},{"field":"reference","message":"is required"},{"field":"bucket","message":"unknown bucket (known: general_insights, goal_generation, lead_generation, revenue_forecast, strategy_analysis)"}]}'),
    ('grant_unknown_org', 404, PROBLEM, '{"type":"https://creditgate.dev/problems/unknown_org","title":"Unknown organization","status":404,"detail":"No organization \'nobody\': create it with PUT /admin/orgs/{org}","code":"unknown_org","org":"nobody"}'),
    ('balance', 200, JSON, '{"org":"acme","plan":"pro","period":"2026-11","period_start":"2026-11-01T00:00:00Z","period_end":"2026-12-01T00:00:00Z","refresh_at":"2026-12-01T00:00:00Z","buckets":{"general_insights":{"allocated":40,"balance":40,"extra":0,"used":0,"available":40,"in_plan":true,"overage":0},"goal_generation":{"allocated":20,"balance":20,"extra":10,"used":0,"available":30,"in_plan":true,"overage":0},"lead_generation":{"allocated":60,"balance":60,"extra":0,"used":0,"available":60,"in_plan":true,"overage":0},"revenue_forecast":{"allocated":40,"balance":40,"extra":0,"used":0,"available":40,"in_plan":true,"overage":0},"strategy_analysis":{"allocated":40,"balance":40,"extra":0,"used":0,"available":40,"in_plan":true,"overage":0}},"features":{"general_insights":{"cost":1,"bucket":"general_insights","allowed":true},"goal_generation":{"cost":3,"bucket":"goal_generation","allowed":true},"lead_generation":{"cost":5,"bucket":"lead_generation","allowed":true},"revenue_forecast":{"cost":4,"bucket":"revenue_forecast","allowed":true},"strategy_analysis":{"cost":2,"bucket":"strategy_analysis","allowed":true}},"levels":[{"level":"key","id":"*","buckets":{}}]}'),
    ('check', 200, JSON, '{"allowed":true,"code":null,"feature":"goal_generation","bucket":"goal_generation","cost":3,"balance":30,"refresh_at":"2026-12-01T00:00:00Z"}'),
    ('check_refused', 200, JSON, '{"allowed":false,"code":"insufficient_tokens","feature":"goal_generation","bucket":"goal_generation","cost":33,"balance":30,"refresh_at":"2026-12-01T00:00:00Z"}'),
    ('check_invalid', 422, PROBLEM, '{"type":"https://creditgate.dev/problems/invalid_request","title":"Invalid request","status":422,"detail":"feature: must be a string; quantity: must be between 1 and 1000","code":"invalid_request","errors":[{"field":"feature","message":"must be a string"},{"field":"quantity","message":"must be between 1 and 1000"}]}'),
    ('check_unknown', 422, PROBLEM, '{"type":"https://creditgate.dev/problems/unknown_feature","title":"Unknown feature","status":422,"detail":"No feature named \'nope\' (known: general_insights, goal_generation, lead_generation, revenue_forecast, strategy_analysis)","code":"unknown_feature","feature":"nope"}'),
    ('check_not_json', 400, PROBLEM, '{"type":"https://creditgate.dev/problems/bad_request","title":"Bad request","status":400,"detail":"The body must be a JSON object","code":"bad_request"}'),
    ('deduct', 200, JSON, '{"charged":3,"replayed":false,"remaining":27,"feature":"goal_generation","bucket":"goal_generation","request_id":"*"}'),
    ('deduct_replay', 200, JSON, '{"charged":0,"replayed":true,"remaining":27,"feature":"goal_generation","bucket":"goal_generation","request_id":null}'),
    ('deduct_refused', 402, PROBLEM, '{"type":"https://creditgate.dev/problems/insufficient_tokens","title":"Not enough tokens","status":402,"detail":"goal_generation costs 60 tokens and 27 are left in bucket goal_generation","code":"insufficient_tokens","feature":"goal_generation","cost":60,"balance":27,"refresh_at":"2026-12-01T00:00:00Z","level":"org","remaining":27}'),
    ('deduct_invalid', 422, PROBLEM, '{"type":"https://creditgate.dev/problems/invalid_request","title":"Invalid request","status":422,"detail":"idempotency_key: must be 1-255 characters; user_id: must be 1-200 printable ASCII characters without spaces","code":"invalid_request","errors":[{"field":"idempotency_key","message":"must be 1-255 characters"},{"field":"user_id","message":"must be 1-200 printable ASCII characters without spaces"}]}'),
    ('stats', 200, JSON, '{"org":"acme","days":2,"from":"2026-11-14","to":"2026-11-15","period":"2026-11","refresh_at":"2026-12-01T00:00:00Z","by_feature":[{"feature":"lead_generation","requests":1,"tokens":5},{"feature":"goal_generation","requests":1,"tokens":3}],"by_user":[{"user_id":"bob","requests":1,"tokens":5},{"user_id":"alice","requests":1,"tokens":3}],"by_day":[{"day":"2026-11-14","requests":0,"tokens":0},{"day":"2026-11-15","requests":2,"tokens":8}],"forecast":{"general_insights":{"available":40,"burn_per_day":0.0,"days_left":null,"empty_on":null,"empties_before_refresh":false},"goal_generation":{"available":27,"burn_per_day":0.43,"days_left":63.0,"empty_on":"2027-01-17","empties_before_refresh":false},"lead_generation":{"available":55,"burn_per_day":0.71,"days_left":77.0,"empty_on":"2027-01-31","empties_before_refresh":false},"revenue_forecast":{"available":40,"burn_per_day":0.0,"days_left":null,"empty_on":null,"empties_before_refresh":false},"strategy_analysis":{"available":40,"burn_per_day":0.0,"days_left":null,"empty_on":null,"empties_before_refresh":false}},"by_model":[],"overage":0,"group":null,"by_group":null}'),
    ('stats_bad', 400, PROBLEM, '{"type":"https://creditgate.dev/problems/bad_request","title":"Bad request","status":400,"detail":"days must be an integer","code":"bad_request"}'),
    ('usage', 200, JSON, '{"items":[{"id":0,"event_id":"*","created_at":"*","kind":"charge","feature":"lead_generation","bucket":"lead_generation","user_id":"bob","tokens":5,"balance_after":55,"extra_after":0,"request_id":"*","method":null,"route":"deduct","upstream_status":null,"latency_ms":null,"plan":"pro","reference":null,"model":null,"input_tokens":null,"cached_input_tokens":null,"output_tokens":null,"reasoning_tokens":null,"reserved":null,"charged":5,"overage":0,"cost_source":null,"usage_missing":false},{"id":0,"event_id":"*","created_at":"*","kind":"reset","feature":null,"bucket":"lead_generation","user_id":null,"tokens":-60,"balance_after":60,"extra_after":0,"request_id":"*","method":null,"route":null,"upstream_status":null,"latency_ms":null,"plan":"pro","reference":null,"model":null,"input_tokens":null,"cached_input_tokens":null,"output_tokens":null,"reasoning_tokens":null,"reserved":null,"charged":null,"overage":0,"cost_source":null,"usage_missing":false}],"next_cursor":"*"}'),
    ('usage_bad', 400, PROBLEM, '{"type":"https://creditgate.dev/problems/bad_request","title":"Bad request","status":400,"detail":"cursor is not valid: pass back a next_cursor unchanged","code":"bad_request"}'),
    ('unauthenticated', 401, PROBLEM, '{"type":"https://creditgate.dev/problems/unauthenticated","title":"Unauthenticated","status":401,"detail":"no credentials: send Authorization: Bearer <API key> or X-API-Key","code":"unauthenticated"}'),
    ('get_org', 200, JSON, '{"org":"acme","plan":"pro","period":"2026-11","period_start":"2026-11-01T00:00:00Z","period_end":"2026-12-01T00:00:00Z","refresh_at":"2026-12-01T00:00:00Z","buckets":{"general_insights":{"allocated":40,"balance":40,"extra":0,"used":0,"available":40,"in_plan":true,"overage":0},"goal_generation":{"allocated":20,"balance":17,"extra":10,"used":3,"available":27,"in_plan":true,"overage":0},"lead_generation":{"allocated":60,"balance":55,"extra":0,"used":5,"available":55,"in_plan":true,"overage":0},"revenue_forecast":{"allocated":40,"balance":40,"extra":0,"used":0,"available":40,"in_plan":true,"overage":0},"strategy_analysis":{"allocated":40,"balance":40,"extra":0,"used":0,"available":40,"in_plan":true,"overage":0}},"features":{"general_insights":{"cost":1,"bucket":"general_insights","allowed":true},"goal_generation":{"cost":3,"bucket":"goal_generation","allowed":true},"lead_generation":{"cost":5,"bucket":"lead_generation","allowed":true},"revenue_forecast":{"cost":4,"bucket":"revenue_forecast","allowed":true},"strategy_analysis":{"cost":2,"bucket":"strategy_analysis","allowed":true}},"created_at":"*","keys":["key_*"]}'),
    ('get_org_unknown', 404, PROBLEM, '{"type":"https://creditgate.dev/problems/unknown_org","title":"Unknown organization","status":404,"detail":"No organization \'nobody\': create it with PUT /admin/orgs/{org}","code":"unknown_org","org":"nobody"}'),
    ('orgs_spend', 200, JSON, '{"sort":"spend","from":"2026-11-01","to":"2026-11-15","items":[{"org":"acme","plan":"pro","tokens":8,"requests":2,"from":"2026-11-01"}]}'),
    ('orgs_id', 200, JSON, '{"sort":"id","from":"2026-11-01","to":"2026-11-15","items":[{"org":"acme","plan":"pro","tokens":8,"requests":2,"from":"2026-11-01"}]}'),
    ('orgs_bad', 400, PROBLEM, '{"type":"https://creditgate.dev/problems/bad_request","title":"Bad request","status":400,"detail":"sort must be spend or id","code":"bad_request"}'),
    ('usage_window', 200, JSON, '{"from":"2026-11-14","to":"2026-11-15","totals":{"requests":2,"tokens":8,"orgs":1},"by_feature":[{"feature":"lead_generation","requests":1,"tokens":5},{"feature":"goal_generation","requests":1,"tokens":3}],"by_day":[{"day":"2026-11-14","requests":0,"tokens":0},{"day":"2026-11-15","requests":2,"tokens":8}],"by_org":[{"org":"acme","requests":2,"tokens":8}],"by_user":[{"org":"acme","user_id":"bob","requests":1,"tokens":5,"share":0.625},{"org":"acme","user_id":"alice","requests":1,"tokens":3,"share":0.375}],"by_model":[],"overage":0}'),
    ('usage_window_bad', 400, PROBLEM, '{"type":"https://creditgate.dev/problems/bad_request","title":"Bad request","status":400,"detail":"from must not be after to","code":"bad_request"}'),
    ('admin_unauthenticated', 401, PROBLEM, '{"type":"https://creditgate.dev/problems/unauthenticated","title":"Unauthenticated","status":401,"detail":"send Authorization: Bearer <admin_token>","code":"unauthenticated"}'),
    ('delete_key', 204, "", ''),
    ('delete_key_unknown', 404, PROBLEM, '{"type":"https://creditgate.dev/problems/unknown_key","title":"Unknown key","status":404,"detail":"No API key \'key_nope\'","code":"unknown_key"}'),
    ('not_found', 404, PROBLEM, '{"type":"https://creditgate.dev/problems/not_found","title":"Not found","status":404,"detail":"No such endpoint: /api/v1/tokens/nope","code":"not_found"}'),
    ('method_not_allowed', 405, PROBLEM, '{"type":"https://creditgate.dev/problems/method_not_allowed","title":"Method not allowed","status":405,"detail":"GET is not supported on /api/v1/tokens/deduct","code":"method_not_allowed"}'),
]  # fmt: skip


async def test_every_answer_is_byte_for_byte_what_it_was(env: Env) -> None:
    got = await _walk(env)
    assert [g[0] for g in got] == [r[0] for r in RECORDED]
    for g, r in zip(got, RECORDED, strict=True):
        assert g == r

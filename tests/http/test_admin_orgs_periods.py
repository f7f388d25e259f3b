"""``GET /admin/orgs`` (``sort=spend`` and ``sort=id``) with per-org periods (issue 9,
contract A12): each org's usage is summed over its own current period, not the calendar
month; ``from`` of each item is where its window starts. Real Redis, a migrated
throwaway Postgres, real charges synced on the simulated clock."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from gateway.core.anchors import Calendar
from gateway.ledger.usage import OrgPeriods
from tests.support.api_support import ADMIN, Env, make_env
from tests.support.pg import requires_postgres

pytestmark = requires_postgres

ANCHORED = {"every": "month", "anchor": "subscription", "timezone": "UTC"}


def at(month: int, day: int, hour: int = 12) -> int:
    return int(datetime(2026, month, day, hour, tzinfo=UTC).timestamp() * 1000)


async def put(env: Env, org: str, body: dict[str, Any]) -> None:
    r = await env.http.put(f"/admin/orgs/{org}", json=body, headers=ADMIN)
    assert r.status_code in (200, 201), r.text


async def spend(env: Env, when: int, *orgs: str) -> None:
    env.clock.set(when)
    for org in orgs:
        assert (await env.gate.charge(org, "lead_generation")).ok  # 5 tokens


async def history(env: Env) -> None:
    """Four orgs' charges since September; the clock ends at Nov 15 12:00 UTC.

    - ``cal``: no anchor, the calendar month (Nov 1 ...);
    - ``a10``: anchored on the 10th since September: its period is Nov 10 .. Dec 10;
    - ``a20``: anchored on the 20th since September: Oct 20 .. Nov 20 (a calendar
      listing would miss its October days);
    - ``new``: anchored on the 5th on Nov 14: its first period starts that day.
    """
    env.clock.set(at(9, 1))
    await put(env, "cal", {"plan": "pro"})
    await put(env, "a10", {"plan": "pro", "period_anchor": "2026-09-10"})
    await put(env, "a20", {"plan": "pro", "period_anchor": "2026-09-20"})
    await put(env, "new", {"plan": "pro"})
    await spend(env, at(10, 25), "cal", "a20")
    await spend(env, at(11, 3), "cal", "a10", "a20")
    await spend(env, at(11, 12), "a10", "new")
    env.clock.set(at(11, 14))
    await put(env, "new", {"period_anchor": "2026-12-05"})
    await spend(env, at(11, 14), "new")
    await spend(env, at(11, 15), "cal")
    await env.sync()


async def test_top_spenders_over_each_orgs_own_period() -> None:
    async for env in make_env(period=ANCHORED):
        await history(env)
        r = await env.http.get("/admin/orgs?sort=spend", headers=ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["from"], body["to"]) == ("2026-11-01", "2026-11-15")  # the calendar's
        assert [(o["org"], o["tokens"], o["requests"], o["from"]) for o in body["items"]] == [
            ("a20", 10, 2, "2026-10-20"),  # Oct 25 and Nov 3
            ("cal", 10, 2, "2026-11-01"),  # Nov 3 and Nov 15, not Oct 25
            ("a10", 5, 1, "2026-11-10"),  # Nov 12, not Nov 3
            ("new", 5, 1, "2026-11-14"),  # Nov 14, not Nov 12 (before its anchor)
        ]
        r = await env.http.get("/admin/orgs?sort=id&limit=3", headers=ADMIN)
        assert [(o["org"], o["tokens"], o["from"]) for o in r.json()["items"]] == [
            ("a10", 5, "2026-11-10"), ("a20", 10, "2026-10-20"), ("cal", 10, "2026-11-01"),
        ]  # fmt: skip
        r = await env.http.get("/admin/orgs?sort=id&after=cal", headers=ADMIN)
        assert [(o["org"], o["tokens"], o["from"]) for o in r.json()["items"]] == [
            ("new", 5, "2026-11-14"),
        ]
        # The org's own /admin/orgs/{org} agrees on where its period starts.
        detail = (await env.http.get("/admin/orgs/a20", headers=ADMIN)).json()
        assert detail["period_start"] == "2026-10-20T00:00:00Z"


async def test_calendar_deployments_keep_the_calendar_month() -> None:
    """Without per-org periods every org's window is the calendar month (the anchors in
    the database, if any, are ignored as the meter ignores them)."""
    async for env in make_env():
        env.clock.set(at(9, 1))
        await put(env, "cal", {"plan": "pro"})
        await spend(env, at(10, 25), "cal")
        await spend(env, at(11, 3), "cal")
        env.clock.set(at(11, 15))
        await env.sync()
        body = (await env.http.get("/admin/orgs?sort=spend", headers=ADMIN)).json()
        assert [(o["org"], o["tokens"], o["from"]) for o in body["items"]] == [
            ("cal", 5, "2026-11-01"),
        ]


def test_periods_in_a_time_zone_start_on_the_utc_day_of_local_midnight() -> None:
    """The rollups are per UTC day: a period starting at local midnight east of UTC is
    read from the UTC day before (Tokyo's Nov 10 00:00 is Nov 9 15:00 UTC), west of UTC
    from the same date (New York's is Nov 10 05:00 UTC)."""
    now = at(11, 15)
    tokyo = OrgPeriods.at(Calendar("month", "subscription", "Asia/Tokyo"), now)
    assert tokyo.anchor_starts is not None and tokyo.anchor_starts[9] == date(2026, 11, 10)
    assert tokyo.start == date(2026, 10, 31)  # Nov 1 00:00 JST
    assert tokyo.earliest == date(2026, 10, 15)  # anchor 16: Oct 16 00:00 JST
    york = OrgPeriods.at(Calendar("month", "subscription", "America/New_York"), now)
    assert york.start == date(2026, 11, 1) and york.earliest == date(2026, 10, 16)
    plain = OrgPeriods.at(Calendar(), now)
    assert (plain.start, plain.today, plain.anchor_starts) == (
        date(2026, 11, 1), date(2026, 11, 15), None,
    )  # fmt: skip


async def test_an_anchored_orgs_window_in_a_time_zone() -> None:
    tz = {**ANCHORED, "timezone": "Asia/Tokyo"}
    async for env in make_env(period=tz):
        env.clock.set(at(9, 1))
        await put(env, "a10", {"plan": "pro", "period_anchor": "2026-09-10"})
        await spend(env, at(11, 9, 10), "a10")  # Nov 9 19:00 JST: the last period
        await spend(env, at(11, 9, 16), "a10")  # Nov 10 01:00 JST: this one
        env.clock.set(at(11, 15))
        await env.sync()
        body = (await env.http.get("/admin/orgs?sort=spend", headers=ADMIN)).json()
        # Whole UTC days: Nov 9 (UTC) holds both charges, and the window starts on it.
        assert [(o["org"], o["tokens"], o["from"]) for o in body["items"]] == [
            ("a10", 10, "2026-11-09"),
        ]

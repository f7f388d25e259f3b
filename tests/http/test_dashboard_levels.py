"""The org dashboard shows the caller's own levels (contract A10) in headless Chromium: the
team, user and key caps with what each used and has left, exactly as ``GET /balance``
reports them, after real charges on the real Redis and a throwaway Postgres."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from gateway.commands.server import GatewayApp
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from tests.http.test_dashboard import ARGS, CHROMIUM, _config
from tests.http.test_dashboard import pytestmark as browser_marks
from tests.support.api_support import ADMIN, PREFIX, auth, clean_prefix
from tests.support.pg import temp_database
from tests.support.reference import MID_NOVEMBER_MS
from tests.support.upstream_app import serve_in_thread

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = browser_marks


async def _ok(r: httpx.Response) -> Any:
    assert r.status_code in (200, 201), r.text
    return r.json()


async def _levels_shown(page: Any) -> list[list[str]]:
    rows: list[list[str]] = await page.eval_on_selector_all(
        "#levels tbody tr",
        "rows => rows.map(r => [r.dataset.level, r.dataset.bucket,"
        " ...[...r.cells].slice(3).map(c => c.textContent)])",
    )
    return rows


async def test_org_dashboard_shows_the_callers_levels() -> None:
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    async with temp_database(migrated=True) as dsn:
        config = _config(prefix, dsn)
        try:
            app = GatewayApp(CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS)), sync=False)
            with serve_in_thread(app) as url:
                async with httpx.AsyncClient(base_url=url, headers=ADMIN) as http:
                    await _ok(await http.put("/admin/orgs/acme", json={"plan": "team"}))
                    await _ok(await http.put(
                        "/admin/orgs/acme/teams/red",
                        json={"caps": {"lead_generation": 40, "goal_generation": "50%"}},
                    ))  # fmt: skip
                    await _ok(await http.put(
                        "/admin/orgs/acme/users/alice", json={"caps": {"lead_generation": 20}}
                    ))  # fmt: skip
                    created = await _ok(await http.post("/admin/keys", json={
                        "org": "acme", "user": "alice", "team": "red",
                        "caps": {"lead_generation": 10},
                    }))  # fmt: skip
                    org_key = (await _ok(await http.post("/admin/keys", json={"org": "acme"})))[
                        "key"
                    ]
                    key = created["key"]
                    for feature in ("lead_generation", "lead_generation", "goal_generation"):
                        await _ok(await http.post(
                            f"{PREFIX}/deduct", json={"feature": feature}, headers=auth(key)
                        ))  # fmt: skip
                    levels = (await _ok(await http.get(f"{PREFIX}/balance", headers=auth(key))))[
                        "levels"
                    ]
                # What the page must show: every level and capped bucket of /balance.
                expected = [
                    [lv["level"], bucket, f"{b['cap']:,}", f"{b['used']:,}", f"{b['remaining']:,}"]
                    for lv in levels
                    for bucket, b in lv["buckets"].items()
                ]
                assert sorted(expected) == [
                    ["key", "lead_generation", "10", "2", "8"],
                    ["team", "goal_generation", "50", "1", "49"],
                    ["team", "lead_generation", "40", "2", "38"],
                    ["user", "lead_generation", "20", "2", "18"],
                ]
                async with playwright_api.async_playwright() as pw:
                    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                    page = await browser.new_page(viewport={"width": 1280, "height": 1000})
                    await page.goto(f"{url}/api/v1/tokens/dashboard")
                    await page.fill("#key", key)
                    await page.click("button[type=submit]")
                    await page.wait_for_selector("body[data-ready='1']")
                    assert await page.is_visible("#levels-panel")
                    assert await _levels_shown(page) == expected
                    ids = await page.eval_on_selector_all(
                        "#levels tbody tr", "rows => rows.map(r => r.cells[1].textContent)"
                    )
                    assert set(ids) == {"red", "alice", created["id"]}
                    # An org key without a team, user or caps has no levels: no panel.
                    await page.click("#signout")
                    await page.fill("#key", org_key)
                    await page.click("button[type=submit]")
                    await page.wait_for_selector("body[data-ready='1']")
                    assert await page.is_hidden("#levels-panel")
                    await browser.close()
        finally:
            await clean_prefix(prefix)

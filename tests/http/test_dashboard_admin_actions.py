"""The admin dashboard's actions in headless Chromium (Playwright), against a gate served by
uvicorn on the real Redis and a throwaway Postgres: each action is done through the page
like an operator would, and its effect is checked through the admin/token API or the
database, not only in the DOM. Also: the admin token stays in sessionStorage only (as the
org dashboard keeps its key), a new key is shown once and gone from the page after
"Done", and ids and names with markup are shown as text.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from gateway.commands.server import GatewayApp
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from tests.http.test_dashboard import ARGS, CHROMIUM, OUT, _config
from tests.http.test_dashboard import pytestmark as browser_marks
from tests.support.api_support import ADMIN, ADMIN_TOKEN, PREFIX, auth, clean_prefix
from tests.support.pg import temp_database
from tests.support.reference import MID_NOVEMBER_MS
from tests.support.upstream_app import serve_in_thread

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = browser_marks

EVIL_ORG = "<b>evil&amp;\"'"  # a valid org id (printable ASCII, no spaces) full of markup
EVIL_NAME = '<img src=x onerror="window.__xss=1">Red'
BUCKET = "lead_generation"


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, str, CreditGate, httpx.AsyncClient]]:
    """(base URL, the database's DSN, a gate of the deployment, a client of the server)."""
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    async with temp_database(migrated=True) as dsn:
        config = _config(prefix, dsn)
        gate = CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS))
        try:
            await gate.set_plan("acme", "team")
            await gate.set_plan(EVIL_ORG, "team")
            app = GatewayApp(CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS)), sync=False)
            with serve_in_thread(app) as url:
                async with httpx.AsyncClient(base_url=url) as http:
                    yield url, dsn, gate, http
        finally:
            await gate.close()
            await clean_prefix(prefix)


async def _done(page: Any, ok: bool = True) -> str:
    """Wait for the action in flight to finish; assert how; return its message."""
    await page.wait_for_function(
        "() => ['ok', 'error'].includes(document.getElementById('action-status').dataset.state)"
    )
    state = await page.eval_on_selector("#action-status", "e => e.dataset.state")
    text: str = await page.inner_text("#action-status")
    assert state == ("ok" if ok else "error"), text
    return text


async def _show(page: Any, org: str) -> None:
    await page.fill("#org-input", org)
    await page.click("#org-form button[type=submit]")
    await page.wait_for_function(
        "org => document.getElementById('manage-org').textContent === org"
        " && !document.getElementById('manage').hidden",
        arg=org,
    )


async def _admin(http: httpx.AsyncClient, path: str) -> Any:
    r = await http.get(path, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def _teams(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {t["team"]: t for t in (await _admin(http, "/admin/orgs/acme/teams"))["items"]}


async def test_admin_dashboard_actions(
    served: tuple[str, str, CreditGate, httpx.AsyncClient],
) -> None:
    url, dsn, gate, http = served
    OUT.mkdir(exist_ok=True)
    db = await asyncpg.connect(dsn)
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = await browser.new_context(viewport={"width": 1280, "height": 1400})
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        dialogs: list[str] = []
        accepting: list[asyncio.Future[None]] = []  # kept until done (not collected)

        def on_dialog(dialog: Any) -> None:
            dialogs.append(dialog.message)
            accepting.append(asyncio.ensure_future(dialog.accept()))

        page.on("dialog", on_dialog)
        await page.goto(f"{url}/admin/dashboard")
        await page.fill("#key", ADMIN_TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("body[data-ready='1']")
        # The token: in this tab's sessionStorage only, never in the URL or localStorage.
        assert ADMIN_TOKEN not in page.url
        stored = await page.evaluate("() => sessionStorage.getItem('creditgate.admin_token')")
        assert stored == ADMIN_TOKEN
        assert await page.evaluate("() => localStorage.length") == 0
        await _show(page, "acme")

        # Plan.
        await page.fill("#plan-name", "pro")
        await page.click("#plan-form button[type=submit]")
        assert "team → pro" in await _done(page)
        assert (await _admin(http, "/admin/orgs/acme"))["plan"] == "pro"
        assert (await page.inner_text("#org-detail-head")).startswith("acme · pro plan")

        # Grant: the purchased tokens land in the bucket's balance.
        before = (await gate.balance("acme")).buckets[BUCKET].extra
        await page.select_option("#grant-bucket", BUCKET)
        await page.fill("#grant-amount", "25")
        await page.click("#grant-form button[type=submit]")
        assert "Granted 25" in await _done(page)
        assert (await gate.balance("acme")).buckets[BUCKET].extra == before + 25

        # Teams: create (a name full of markup, shown as text), rename, a second one.
        await page.fill("#team-id", "red")
        await page.fill("#team-name", EVIL_NAME)
        await page.click("#team-form button[type=submit]")
        await _done(page)
        assert (await _teams(http))["red"]["name"] == EVIL_NAME
        rename = "#teams tr[data-team='red'] input[data-role='rename']"
        assert await page.input_value(rename) == EVIL_NAME
        assert await page.evaluate("() => document.querySelectorAll('#manage img').length") == 0
        await page.fill(rename, "Red team")
        await page.click("#teams tr[data-team='red'] button:has-text('Rename')")
        await _done(page)
        assert (await _teams(http))["red"]["name"] == "Red team"
        await page.fill("#team-id", "blue")
        await page.click("#team-form button[type=submit]")
        await _done(page)
        assert set(await _teams(http)) == {"red", "blue"}

        # Users: into a team, then moved to the other.
        for team in ("red", "blue"):
            await page.fill("#user-id", "alice")
            await page.select_option("#user-team", team)
            await page.click("#user-form button[type=submit]")
            await _done(page)
            assert await db.fetchval(
                "SELECT team_id FROM org_users WHERE organization_id = 'acme'"
                " AND user_id = 'alice'"
            ) == team  # fmt: skip

        # A key in team red: shown once, copied, gone from the page after Done.
        await page.fill("#key-user", "bob")
        await page.fill("#key-name", "ci")
        await page.select_option("#key-team", "red")
        await page.click("#key-form button[type=submit]")
        await _done(page)
        key = await page.inner_text("#new-key-value")
        assert key.startswith("cg_")
        r = await http.get(f"{PREFIX}/balance", headers=auth(key))
        assert r.status_code == 200 and r.json()["org"] == "acme"
        await page.click("#new-key-copy")
        await page.wait_for_function(
            "() => document.getElementById('action-status').textContent.includes('copied')"
        )
        assert await page.evaluate("() => navigator.clipboard.readText()") == key
        await page.click("#new-key-done")
        assert await page.is_hidden("#new-key")
        assert key not in await page.content()
        storage = await page.evaluate(
            "() => JSON.stringify([Object.entries(sessionStorage), Object.entries(localStorage)])"
        )
        assert key not in storage
        kid = await db.fetchval("SELECT id FROM api_keys WHERE name = 'ci'")
        assert await db.fetchval("SELECT team_id FROM api_keys WHERE id = $1", kid) == "red"

        # Move the key to blue.
        await page.select_option(f"#keys tr[data-key='{kid}'] select[data-role='move']", "blue")
        assert "moved to blue" in await _done(page)
        assert await db.fetchval("SELECT team_id FROM api_keys WHERE id = $1", kid) == "blue"

        # Caps: a team's set and cleared, a key's set (applied at once: GET /balance).
        async def cap(level: str, ident: str, value: str | None) -> str:
            await page.select_option("#cap-level", level)
            await page.fill("#cap-id", ident)
            await page.select_option("#cap-bucket", BUCKET)
            if value is None:
                await page.click("#cap-clear")
            else:
                await page.fill("#cap-value", value)
                await page.click("#cap-set")
            return await _done(page)

        await cap("team", "blue", "30%")
        assert (await _teams(http))["blue"]["caps"] == {BUCKET: "30%"}
        await cap("key", kid, "5")
        levels = (await http.get(f"{PREFIX}/balance", headers=auth(key))).json()["levels"]
        by_level = {lv["level"]: lv for lv in levels}
        assert by_level["key"]["buckets"][BUCKET]["cap"] == 5
        assert by_level["team"]["id"] == "blue"
        assert by_level["team"]["buckets"][BUCKET]["cap"] == 30 * 60 // 100  # pro: 60
        await cap("team", "blue", None)
        assert (await _teams(http))["blue"]["caps"] == {}
        # A refused action says why and changes nothing; a team cap never creates a team.
        await page.fill("#cap-value", "lots")
        await page.click("#cap-set")
        await _done(page, ok=False)
        await cap_refused(page, "team", "green")
        assert set(await _teams(http)) == {"red", "blue"}
        await page.screenshot(path=str(OUT / "dashboard-admin-actions.png"), full_page=True)

        # Delete a team (after a confirmation): its members are left without one.
        await page.click("#teams tr[data-team='blue'] button:has-text('Delete')")
        await _done(page)
        assert set(await _teams(http)) == {"red"}
        assert await db.fetchval("SELECT team_id FROM api_keys WHERE id = $1", kid) is None

        # Revoke the key (after a confirmation).
        await page.click(f"#keys tr[data-key='{kid}'] button:has-text('Revoke')")
        await _done(page)
        keys = (await _admin(http, "/admin/keys?org=acme"))["items"]
        assert [k["revoked_at"] is not None for k in keys if k["id"] == kid] == [True]
        assert (await page.inner_text(f"#keys tr[data-key='{kid}']")).count("revoked") == 1
        assert len(dialogs) == 2 and "blue" in dialogs[0] and kid in dialogs[1]

        # An org id full of markup is shown as text, and its actions address it exactly.
        await _show(page, EVIL_ORG)
        assert await page.inner_text("#manage-org") == EVIL_ORG
        await page.fill("#team-id", "ops")
        await page.click("#team-form button[type=submit]")
        await _done(page)
        r = await http.get(f"/admin/orgs/{quote(EVIL_ORG, safe='')}/teams", headers=ADMIN)
        assert [t["team"] for t in r.json()["items"]] == ["ops"]
        assert "ops" not in await _teams(http)
        markup = "() => document.querySelectorAll('main b, main img').length"
        assert await page.evaluate(markup) == 0
        assert await page.evaluate("() => window.__xss") is None
        # Only the refused actions may have logged errors (the browser reports the 422s).
        assert all("422" in e for e in errors), errors
        await browser.close()
    await db.close()


async def cap_refused(page: Any, level: str, ident: str) -> None:
    """Try to cap ``level`` ``ident`` and expect the page to refuse it."""
    await page.select_option("#cap-level", level)
    await page.fill("#cap-id", ident)
    await page.fill("#cap-value", "10")
    await page.click("#cap-set")
    assert ident in await _done(page, ok=False)

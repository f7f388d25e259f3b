"""The dashboards in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Real charges go through a gate (real Redis under a unique prefix, a throwaway Postgres, a
sync pass so stats exist); the gateway is served by uvicorn; the test signs in like a
person, checks the numbers against the balances and the bar colours at the thresholds
(computed style), and saves screenshots under test-output/.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.commands.server import GatewayApp
from gateway.config import parse_config
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from sync.worker import SyncWorker
from tests.support.api_support import ADMIN_TOKEN, REDIS, clean_prefix
from tests.support.pg import requires_postgres, temp_database
from tests.support.reference import MID_NOVEMBER_MS, REFERENCE_YAML
from tests.support.upstream_app import serve_in_thread

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = os.environ.get("CREDITGATE_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
OUT = Path(__file__).resolve().parents[2] / "test-output"

pytestmark = [
    requires_postgres,
    # A developer without Chromium may skip; CI (which installs it) must run these.
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and not os.environ.get("CI"),
        reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)",
    ),
]

GREEN, AMBER, RED = "rgb(22, 163, 74)", "rgb(245, 158, 11)", "rgb(220, 38, 38)"
# Bucket -> tokens used of 100 (every feature costs 1 here): the tokens left sit right at
# and around the thresholds (amber under 25% left, red under 10%).
USED = {
    "lead_generation": 74,  # 26% left: green
    "goal_generation": 75,  # 25%: green (amber is strictly under 25%)
    "strategy_analysis": 76,  # 24%: amber
    "revenue_forecast": 90,  # 10%: amber (red is strictly under 10%)
    "general_insights": 91,  # 9%: red
}
COLOUR = {
    "lead_generation": GREEN, "goal_generation": GREEN, "strategy_analysis": AMBER,
    "revenue_forecast": AMBER, "general_insights": RED,
}  # fmt: skip


def _config(prefix: str, dsn: str) -> Any:
    data = yaml.safe_load(REFERENCE_YAML)
    for feature in data["features"].values():
        feature["cost"] = 1
    data["plans"]["team"] = {"allocations": dict.fromkeys(USED, 100)}
    data.update(redis_url=REDIS, key_prefix=prefix, database_url=dsn, admin_token=ADMIN_TOKEN,
                identity={"api_keys": True})  # fmt: skip
    return parse_config(yaml.safe_dump(data), "dashboard-test.yaml")


def _day(day: int) -> int:
    return int(datetime(2026, 11, day, 9, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, str, CreditGate]]:
    """(base URL, an API key of org 'acme', a gate of the same deployment)."""
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    async with temp_database(migrated=True) as dsn:
        config = _config(prefix, dsn)
        clock = FixedClock(MID_NOVEMBER_MS)
        gate = CreditGate(config, clock=clock)
        try:
            await gate.set_plan("acme", "team")
            await gate.set_plan("globex", "pro")
            _, key = await gate.create_key("acme", name="dashboard")
            users = ["alice", "bob", "carol"]
            for n, (bucket, used) in enumerate(USED.items()):
                # Spread each bucket's use over days and users, so the chart and the
                # top-users table have something to show.
                parts = [used // 3, used // 3, used - 2 * (used // 3)]
                for i, part in enumerate(parts):
                    clock.set(_day(5 + 4 * i + n % 2))
                    assert (await gate.charge("acme", bucket, user=users[(n + i) % 3],
                                              quantity=part)).ok  # fmt: skip
            clock.set(_day(14))
            assert (await gate.charge("globex", "lead_generation", user="gus", quantity=3)).ok
            clock.set(MID_NOVEMBER_MS)
            await gate.meter.drain()
            store = await gate.require_store()
            await SyncWorker(
                redis=gate.redis.client, pool=store.pool, keyspace=gate.keys
            ).run_once()
            # The server runs its own gate (its own event loop) on the same deployment.
            app = GatewayApp(CreditGate(config, clock=clock), sync=False)
            with serve_in_thread(app) as url:
                yield url, key, gate
        finally:
            await gate.close()
            await clean_prefix(prefix)


async def _colour(page: Any, selector: str) -> str:
    value: str = await page.eval_on_selector(selector, "el => getComputedStyle(el).backgroundColor")
    return value


async def test_org_dashboard(served: tuple[str, str, CreditGate]) -> None:
    url, key, gate = served
    OUT.mkdir(exist_ok=True)
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        await page.goto(f"{url}/api/v1/tokens/dashboard")
        await page.wait_for_selector("#login-form", state="visible")
        await page.screenshot(path=str(OUT / "dashboard-login.png"))
        await page.fill("#key", "cg_" + "x" * 43)
        await page.click("button[type=submit]")
        await page.wait_for_function(
            "() => document.getElementById('login-error').textContent.length > 0"
        )
        assert "not accepted" in await page.inner_text("#login-error")

        await page.fill("#key", key)
        await page.click("button[type=submit]")
        await page.wait_for_selector("body[data-ready='1']")
        assert key not in page.url
        assert await page.evaluate("() => sessionStorage.getItem('creditgate.api_key')") == key

        balance = await gate.balance("acme")
        for bucket, colour in COLOUR.items():
            card = f".card[data-bucket='{bucket}']"
            shown = await page.inner_text(f"{card} .available")
            assert shown == str(balance.buckets[bucket].available) == str(100 - USED[bucket])
            assert await _colour(page, f"{card} .bar-fill") == colour, bucket
            width = await page.eval_on_selector(
                f"{card} .bar-fill", "el => el.getBoundingClientRect().width / "
                "el.parentElement.getBoundingClientRect().width",
            )  # fmt: skip
            assert abs(width - (100 - USED[bucket]) / 100) < 0.01
        assert (await page.text_content("#plan")) == "Team plan"
        assert "Dec 1, 2026" in await page.inner_text("#period")

        # The chart: one column per day, adding up to every token used.
        columns = await page.eval_on_selector_all(
            "#chart rect.col", "els => els.map(e => Number(e.dataset.tokens))"
        )
        assert len(columns) == 30 and sum(columns) == sum(USED.values())
        users = await page.eval_on_selector_all(
            "#users tbody tr", "rows => rows.map(r => r.cells[0].textContent)"
        )
        assert sorted(users) == ["alice", "bob", "carol"]
        forecast = await page.inner_text(".card[data-bucket='general_insights'] .forecast")
        assert "days left" in forecast
        activity = await page.eval_on_selector_all("#activity tbody tr", "rows => rows.length")
        assert activity == 10
        await page.screenshot(path=str(OUT / "dashboard-org.png"), full_page=True)

        await page.reload()  # the key survives a reload of the tab
        await page.wait_for_selector("body[data-ready='1']")
        await page.click("#signout")
        await page.wait_for_selector("#login-form", state="visible")
        assert await page.evaluate("() => sessionStorage.getItem('creditgate.api_key')") is None
        # Only the refused sign-in may have logged an error (the browser reports the 401).
        assert all("401" in e for e in errors), errors
        await browser.close()


async def test_admin_dashboard(served: tuple[str, str, CreditGate]) -> None:
    url, _, _ = served
    OUT.mkdir(exist_ok=True)
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(f"{url}/admin/dashboard")
        await page.fill("#key", ADMIN_TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("body[data-ready='1']")
        spenders = await page.eval_on_selector_all(
            "#spenders tbody tr",
            "rows => rows.map(r => [r.cells[0].textContent, r.cells[2].textContent])",
        )
        assert spenders == [["acme", str(sum(USED.values()))], ["globex", "3"]]
        since = await page.eval_on_selector_all(
            "#spenders tbody tr", "rows => rows.map(r => r.cells[4].textContent)"
        )
        assert since == ["2026-11-01", "2026-11-01"]  # each org's own period's first day
        assert await page.inner_text("[data-tile='orgs'] .value") == "2"
        features = await page.eval_on_selector_all(".hbar", "els => els.map(e => e.dataset.key)")
        assert features[0] == "general_insights" and len(features) == 5
        # The first spender's balances are shown, with the same colours as its own page.
        await page.wait_for_selector("#org-buckets .card")
        assert (
            await _colour(page, "#org-buckets .card[data-bucket='general_insights'] .bar-fill")
            == RED
        )
        await page.click("#spenders tbody tr:nth-child(2)")
        await page.wait_for_function(
            "() => document.getElementById('org-detail-head').textContent.startsWith('globex')"
        )
        head = await page.inner_text("#org-detail-head")
        assert head.startswith("globex · pro plan")
        globex = await page.inner_text(
            "#org-buckets .card[data-bucket='lead_generation'] .available"
        )
        assert globex == "57"  # pro: 60 lead tokens, 3 used
        await page.screenshot(path=str(OUT / "dashboard-admin.png"), full_page=True)
        await browser.close()


async def test_org_dashboard_without_a_ledger_shows_balances_only() -> None:
    """No database: the balances still show; statistics say why they are missing."""
    import time

    import jwt

    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    secret = "dashboard-test-secret-0123456789abcdef"
    data = yaml.safe_load(REFERENCE_YAML)
    data.update(redis_url=REDIS, key_prefix=prefix, database_url="",
                identity={"api_keys": True, "jwt": {"secret": secret}})  # fmt: skip
    config = parse_config(yaml.safe_dump(data), "dashboard-nodb.yaml")
    gate = CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS))
    try:
        await gate.set_plan("acme", "pro")
        assert (await gate.charge("acme", "goal_generation")).ok
        await gate.meter.drain()
        token = jwt.encode({"org_id": "acme", "sub": "alice", "exp": int(time.time()) + 600},
                           secret, algorithm="HS256")  # fmt: skip
        app = GatewayApp(CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS)), sync=False)
        with serve_in_thread(app) as url:
            async with playwright_api.async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                await page.goto(f"{url}/api/v1/tokens/dashboard")
                await page.fill("#key", token)
                await page.click("button[type=submit]")
                await page.wait_for_selector("body[data-ready='1']")
                card = ".card[data-bucket='goal_generation']"
                assert await page.inner_text(f"{card} .available") == "17"
                assert await _colour(page, f"{card} .bar-fill") == GREEN  # 85% left
                note = await page.inner_text("#chart")
                assert "unavailable" in note and "database" in note
                await browser.close()
    finally:
        await gate.close()
        await clean_prefix(prefix)


# -- usage by model (issue 8: what the AI call cost) -------------------------------------

# (id, model, net tokens, overage, uncached input, cached input, output, reasoning,
#  cost source, usage missing): usage events as settle.lua writes them.
MODEL_EVENTS = [
    ("rq-1", "gpt-4o-mini", 40, 0, 3000, 1000, 1200, 0, "usage", ""),
    ("rq-2", "gpt-4o-mini", 25, 5, 2000, 0, 900, 0, "usage", ""),
    ("rq-3", "claude-3-5-sonnet", 30, 0, 800, 0, 1500, 400, "usage", ""),
    ("rq-4", "", 20, 0, "", "", "", "", "policy", "1"),
]


@pytest.fixture
async def served_models() -> AsyncIterator[tuple[str, str]]:
    """(base URL, an API key of org 'initech', whose requests were priced by their usage)."""
    from tests.sync.test_usage_fields import usage_event

    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    async with temp_database(migrated=True) as dsn:
        config = _config(prefix, dsn)
        clock = FixedClock(MID_NOVEMBER_MS)
        gate = CreditGate(config, clock=clock)
        try:
            await gate.set_plan("initech", "team")
            _, key = await gate.create_key("initech", name="dashboard")
            assert (await gate.charge("initech", "lead_generation", user="ivy")).ok
            await gate.meter.drain()
            redis: Any = gate.redis.client
            for rid, model, t, ov, ui, uc, uo, ur, cs, um in MODEL_EVENTS:
                await redis.xadd(gate.keys.shard("initech").events, usage_event(
                    "initech", id=rid, t=t, ov=ov, rs=30, mdl=model, ui=ui, uc=uc, uo=uo,
                    ur=ur, cs=cs, um=um, f="general_insights", b="general_insights", u="ivy",
                    s="", ts=_day(14), st=200, lat=20,
                ))  # fmt: skip
            store = await gate.require_store()
            await SyncWorker(
                redis=gate.redis.client, pool=store.pool, keyspace=gate.keys
            ).run_once()
            app = GatewayApp(CreditGate(config, clock=clock), sync=False)
            with serve_in_thread(app) as url:
                yield url, key
        finally:
            await gate.close()
            await clean_prefix(prefix)


# What the model table shows, most tokens first: model, requests, input, cached, output,
# reasoning, charged (net + overage), overage, usage missing.
MODEL_ROWS = [
    ["gpt-4o-mini", "2", "5,000", "1,000", "2,100", "0", "70", "5", "0"],
    ["claude-3-5-sonnet", "1", "800", "0", "1,500", "400", "30", "0", "0"],
    ["(none reported)", "1", "0", "0", "0", "0", "20", "0", "1"],
]


async def _model_table(page: Any) -> list[list[str]]:
    rows: list[list[str]] = await page.eval_on_selector_all(
        "#models tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    return rows


async def test_org_dashboard_shows_usage_by_model_and_overage(
    served_models: tuple[str, str],
) -> None:
    url, key = served_models
    OUT.mkdir(exist_ok=True)
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        await page.goto(f"{url}/api/v1/tokens/dashboard")
        await page.fill("#key", key)
        await page.click("button[type=submit]")
        await page.wait_for_selector("body[data-ready='1']")
        assert await _model_table(page) == MODEL_ROWS
        models = await page.eval_on_selector_all(
            "#models tbody tr", "rows => rows.map(r => r.dataset.model)"
        )
        assert models == ["gpt-4o-mini", "claude-3-5-sonnet", ""]
        assert await page.inner_text("#overage") == "Overage 5 tokens · 30 days"
        colour = await page.eval_on_selector("#overage", "el => getComputedStyle(el).color")
        assert colour == RED  # some overage: shown in red
        # The bucket's card says its overage this period (GET /balance, per bucket); the
        # other buckets, with none, say nothing of it.
        card = ".card[data-bucket='general_insights']"
        assert await page.inner_text(f"{card} .overage") == "Overage 5 tokens this period"
        assert await page.eval_on_selector_all(".card .overage", "els => els.length") == 1
        # Recent activity names the model and the overage of each request.
        activity = await page.eval_on_selector_all(
            "#activity tbody tr",
            "rows => rows.map(r => [r.cells[4].textContent, r.cells[6].textContent])",
        )
        assert ["gpt-4o-mini", "5"] in activity and ["claude-3-5-sonnet", ""] in activity
        await page.screenshot(path=str(OUT / "dashboard-org-models.png"), full_page=True)
        assert errors == []
        await browser.close()


async def test_admin_dashboard_shows_usage_by_model_and_overage(
    served_models: tuple[str, str],
) -> None:
    url, _ = served_models
    OUT.mkdir(exist_ok=True)
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 1100})
        await page.goto(f"{url}/admin/dashboard")
        await page.fill("#key", ADMIN_TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("body[data-ready='1']")
        assert await _model_table(page) == MODEL_ROWS
        assert await page.inner_text("#overage") == "Overage 5 tokens · 30 days"
        await page.screenshot(path=str(OUT / "dashboard-admin-models.png"), full_page=True)
        await browser.close()


async def test_dashboards_without_usage_priced_requests_say_so(
    served: tuple[str, str, CreditGate],
) -> None:
    url, key, _ = served
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        for path, credential in (("/api/v1/tokens/dashboard", key),
                                 ("/admin/dashboard", ADMIN_TOKEN)):  # fmt: skip
            await page.goto(f"{url}{path}")
            await page.fill("#key", credential)
            await page.click("button[type=submit]")
            await page.wait_for_selector("body[data-ready='1']")
            assert await _model_table(page) == [["No requests priced by the call yet"]]
            assert await page.inner_text("#overage") == "Overage 0 tokens · 30 days"
            colour = await page.eval_on_selector("#overage", "el => getComputedStyle(el).color")
            assert colour != RED
            await page.evaluate("() => sessionStorage.clear()")
        await browser.close()

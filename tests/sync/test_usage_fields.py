"""The usage fields of the audit event (issue 8: what the AI call cost) through the sync job.

Events carrying ``rs ov mdl ui uc uo ur cs um`` (appended after ``ref``, as settle.lua
writes them; gateway/core/events.py) are XADDed straight to the shard streams, mixed with
old-format events, and must become ledger rows with exactly those values, an exact
``usage_daily_model`` rollup, and nothing doubled when they are delivered again; the
rollup equals the one rebuilt from the log (``creditgate_rebuild_usage_daily_model``).
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from gateway.core.redis_keys import KeySpace
from sync.batch import decode_entries
from sync.records import FIELDS_EXT, USAGE_FIELDS, Times, fast_payload
from sync.sql import SEP
from tests.support.pg import requires_postgres
from tests.support.services import redis_url
from tests.sync.test_sync import (
    NOV_15,
    event,
    expected_daily,
    ledger,
    pending_count,
    scenario,
    worker,
    xadd_all,
)

pytestmark = requires_postgres

MODELS = ["gpt-4o-mini", "claude-3-5-sonnet", "gemini-2.0-flash"]


def usage_event(
    org: str,
    kind: str = "charge",
    *,
    rs: Any = "",
    ov: Any = "",
    mdl: str = "",
    ui: Any = "",
    uc: Any = "",
    uo: Any = "",
    ur: Any = "",
    cs: str = "usage",
    um: str = "",
    **f: Any,
) -> dict[str, str]:
    """A request event with the usage fields, in the order settle.lua appends them."""
    rid = f.pop("id", None) or uuid.uuid4().hex
    f.setdefault("rq", rid)
    e = event(org, kind, id=rid, **f)
    usage = {"rs": rs, "ov": ov, "mdl": mdl, "ui": ui, "uc": uc, "uo": uo, "ur": ur,
             "cs": cs, "um": um}  # fmt: skip
    assert tuple(usage) == USAGE_FIELDS
    e.update({k: str(v) for k, v in usage.items()})
    return e


def usage_scenario(orgs: list[str], n: int, seed: int = 11) -> list[dict[str, str]]:
    """Per org: usage-priced requests of several models and cost sources over two UTC
    days, refunds, missing usage, an expired reservation, interleaved with fixed-cost
    (old-format) requests."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    for org in orgs:
        for i in range(n):
            seq = i + 1
            ts = NOV_15 + i * 90_000  # crosses midnight UTC
            common: dict[str, Any] = {
                "u": f"user{rng.randrange(3)}", "f": "summarize", "b": "general_insights",
                "s": seq, "ts": ts, "m": "POST", "r": "/v1/chat/completions", "st": 200,
                "lat": 40,
            }  # fmt: skip
            roll = rng.random()
            if roll < 0.2:  # a fixed-cost request: no usage fields at all
                rid = uuid.uuid4().hex
                out.append(event(org, "charge", id=rid, rq=rid, t=3, **{**common, "f": "lead"}))
            elif roll < 0.3:  # usage never came: the policy charged the reserve
                out.append(usage_event(org, t=40, rs=40, cs="policy", um="1", **common))
            elif roll < 0.35:  # an upstream error: refunded, usage reported anyway
                out.append(usage_event(org, "refund", t=0, rs=50, mdl=rng.choice(MODELS),
                                       ui=120, uo=0, **{**common, "st": 500}))  # fmt: skip
            elif roll < 0.4:  # the app's header
                out.append(usage_event(org, t=rng.randrange(1, 9), rs=10, cs="header", **common))
            elif roll < 0.43:  # an expired reservation settles at its reserve
                out.append(usage_event(org, "expired_hold", t=25, rs=25, cs="reservation",
                                       **{**common, "s": ""}))  # fmt: skip
            else:
                ui, uc = rng.randrange(0, 4000), rng.randrange(0, 2000)
                uo, ur = rng.randrange(0, 1500), rng.choice([0, 0, rng.randrange(1, 800)])
                t = rng.randrange(1, 60)
                ov = rng.choice([0, 0, 0, rng.randrange(1, 20)])
                out.append(usage_event(org, t=t, rs=rng.choice([30, 64]), ov=ov,
                                       mdl=rng.choice(MODELS), ui=ui, uc=uc, uo=uo, ur=ur,
                                       **common))  # fmt: skip
    return out


def _count(v: str | None) -> int | None:
    return int(v) if v else None


def expected_usage_rows(events: list[dict[str, str]]) -> dict[str, tuple[Any, ...]]:
    """event id -> the usage columns (model, input, cached, output, reasoning, reserved,
    overage, cost_source, usage_missing) the event implies."""
    out = {}
    for e in events:
        out[e["id"]] = (
            e.get("mdl") or None, _count(e.get("ui")), _count(e.get("uc")),
            _count(e.get("uo")), _count(e.get("ur")), _count(e.get("rs")),
            int(e.get("ov") or 0), e.get("cs") or None, e.get("um") == "1",
        )  # fmt: skip
    return out


def expected_models(events: list[dict[str, str]]) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """(org, day, model) -> (requests, tokens, input, cached, output, reasoning, overage,
    usage_missing) over the request events with a cost source or a model."""
    acc: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * 8)
    for e in events:
        if e["k"] not in ("charge", "refund", "expired_hold"):
            continue
        if not (e.get("cs") or e.get("mdl")):
            continue
        day = datetime.fromtimestamp(int(e["ts"]) / 1000, UTC).date()
        cell = acc[(e["o"], day, e.get("mdl", ""))]
        values = (1, int(e["t"]), *(int(e.get(k) or 0) for k in ("ui", "uc", "uo", "ur", "ov")),
                  int(e.get("um") == "1"))  # fmt: skip
        for i, v in enumerate(values):
            cell[i] += v
    return {k: tuple(v) for k, v in acc.items()}


async def usage_rows(pool: asyncpg.Pool) -> dict[str, tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT event_id, model, input_tokens, cached_input_tokens, output_tokens,"
        " reasoning_tokens, reserved, overage, cost_source, usage_missing FROM ai_token_usage_log"
    )
    return {r[0]: tuple(r[1:]) for r in rows}


async def model_rollup(pool: asyncpg.Pool) -> dict[tuple[Any, ...], tuple[int, ...]]:
    rows = await pool.fetch(
        "SELECT organization_id, day, model, requests, tokens, input_tokens,"
        " cached_input_tokens, output_tokens, reasoning_tokens, overage, usage_missing"
        " FROM usage_daily_model"
    )
    return {tuple(r[:3]): tuple(r[3:]) for r in rows}


async def assert_rebuild_agrees(pool: asyncpg.Pool) -> None:
    """The sync job's rollup equals the one rebuilt from the log."""
    kept = await model_rollup(pool)
    written = await pool.fetchval("SELECT creditgate_rebuild_usage_daily_model()")
    assert written == len(kept)
    assert await model_rollup(pool) == kept


# -- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("decode_responses", [True, False])
async def test_usage_events_become_rows_and_an_exact_model_rollup_once(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, decode_responses: bool
) -> None:
    client = redis if decode_responses else Redis.from_url(redis_url())
    events = usage_scenario(["acme", "globex", "initech"], 90)
    assert {e["k"] for e in events} == {"charge", "refund", "expired_hold"}
    n = await xadd_all(redis, keyspace, events)
    w = worker(client, pool, keyspace)
    result = await w.run_once()
    assert (result.read, result.inserted) == (n, n)

    assert await usage_rows(pool) == expected_usage_rows(events)
    models = await model_rollup(pool)
    assert models == expected_models(events)
    assert {k[2] for k in models} == {*MODELS, ""}  # '' = no model reported
    assert len({k[1] for k in models}) == 2  # two UTC days
    assert sum(v[7] for v in models.values()) == sum(e.get("um") == "1" for e in events)
    got = await ledger(pool)
    assert got["daily"] == expected_daily(events)  # usage_daily as before
    await assert_rebuild_agrees(pool)

    # Redelivered (new stream entries, same event ids) with new ones: nothing doubled.
    more = usage_scenario(["acme", "globex"], 30, seed=12)
    await xadd_all(redis, keyspace, events[::2] + more)
    again = await w.run_once()
    assert (again.inserted, again.duplicates) == (len(more), len(events[::2]))
    assert again.fallbacks > 0  # the fast path met the duplicates and redid them safely
    assert await usage_rows(pool) == expected_usage_rows(events + more)
    assert await model_rollup(pool) == expected_models(events + more)
    assert (await ledger(pool))["daily"] == expected_daily(events + more)
    await assert_rebuild_agrees(pool)
    assert await pending_count(redis, keyspace) == 0
    await w.close()
    if not decode_responses:
        await client.aclose()


async def test_old_format_events_land_as_before(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    events = scenario(["acme", "globex"], 40)
    assert all("mdl" not in e for e in events)
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace)
    assert (await w.run_once()).inserted == len(events)
    no_usage = (None, None, None, None, None, None, 0, None, False)
    assert await usage_rows(pool) == dict.fromkeys((e["id"] for e in events), no_usage)
    assert await model_rollup(pool) == {}
    assert (await ledger(pool))["daily"] == expected_daily(events)
    await w.close()


async def test_a_fixed_cost_event_with_empty_usage_fields_counts_no_model(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    """Every usage field present but empty (cs "" = fixed cost): NULL columns, no rollup."""
    e = usage_event("acme", t=3, cs="", f="lead", b="lead_generation", s=1)
    await xadd_all(redis, keyspace, [e])
    w = worker(redis, pool, keyspace)
    assert (await w.run_once()).inserted == 1
    assert await usage_rows(pool) == {e["id"]: (None,) * 6 + (0, None, False)}
    assert await model_rollup(pool) == {}
    await w.close()


async def test_redelivered_usage_events_on_the_safe_path_add_nothing(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    """A batch that is all redeliveries (claimed/re-read: safe path at once) adds no
    rollup; the usage of a half-new batch is counted for its new rows only."""
    events = usage_scenario(["acme"], 60)
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace, batch_size=10_000)
    await w.run_once()
    before = await model_rollup(pool)
    await xadd_all(redis, keyspace, events)
    result = await w.run_once()
    assert (result.inserted, result.duplicates) == (0, len(events))
    assert await model_rollup(pool) == before
    extra = usage_scenario(["acme"], 20, seed=99)
    await xadd_all(redis, keyspace, events[:10] + extra + events[10:20])
    result = await w.run_once()
    assert result.inserted == len(extra)
    assert await model_rollup(pool) == expected_models(events + extra)
    await w.close()


async def test_odd_values_take_the_careful_paths_and_land_exactly(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    """A model name the fast rendering cannot carry (tab, backslash, newline) or the packed
    rollup columns cannot (the separator), usage fields in another order or only some of
    them, a non-canonical integer and um other than "1": all land exactly."""
    odd_models = ["tab\tmodel", "back\\slash", "new\nline", f"sep{SEP}model", "\\N"]
    events = [
        usage_event("acme", t=7, rs=10, mdl=m, ui=100 + i, uc=1, uo=2, ur=3, s=i + 1)
        for i, m in enumerate(odd_models)
    ]
    # Another order and a subset: the reference path reads them by name.
    shuffled = usage_event("acme", t=4, rs=5, ov=2, mdl="gpt-4o", ui=9, uo=8, s=10)
    order = ["um", "cs", "ur", "uo", "uc", "ui", "mdl", "ov", "rs"]
    shuffled = {k: shuffled[k] for k in [k for k in shuffled if k not in order] + order}
    subset = event("acme", "charge", id=uuid.uuid4().hex, t=2, s=11)
    subset.update(mdl="gpt-4o", cs="usage", ui="0012")  # non-canonical: 12
    odd_um = usage_event("acme", t=1, mdl="gpt-4o", um="0", s=12)
    everything = [*events, shuffled, subset, odd_um]
    await xadd_all(redis, keyspace, everything)
    w = worker(redis, pool, keyspace)
    assert (await w.run_once()).inserted == len(everything)
    expected = expected_usage_rows(everything)
    assert expected[subset["id"]] == ("gpt-4o", 12, None, None, None, None, 0, "usage", False)
    assert expected[odd_um["id"]][8] is False
    assert await usage_rows(pool) == expected
    models = await model_rollup(pool)
    assert models == expected_models(everything)
    assert {k[2] for k in models} == {*odd_models, "gpt-4o"}
    await assert_rebuild_agrees(pool)
    await w.close()


async def test_the_rollup_is_per_utc_day(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    before = int(datetime(2026, 11, 15, 23, 59, 59, 999_000, tzinfo=UTC).timestamp() * 1000)
    events = [
        usage_event("acme", t=1, mdl="m", ui=1, ts=before, s=1),
        usage_event("acme", t=2, mdl="m", ui=2, ts=before + 1, s=2),
    ]
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace)
    await w.run_once()
    assert await model_rollup(pool) == {
        ("acme", date(2026, 11, 15), "m"): (1, 1, 1, 0, 0, 0, 0, 0),
        ("acme", date(2026, 11, 16), "m"): (1, 2, 2, 0, 0, 0, 0, 0),
    }
    await w.close()


def test_usage_entries_as_settle_lua_writes_them_take_the_fast_path() -> None:
    """No copy, no reference decode, and the fast COPY rendering, for the usual entry."""
    e = usage_event("acme", t=9, rs=12, ov=1, mdl="gpt-4o-mini", ui=10, uc=2, uo=3, ur=0, s=1)
    flat = [x for kv in e.items() for x in kv]
    rows = decode_entries([("1-0", flat)], Times()).rows
    assert rows.flats[0] == flat[1::2] and rows.usage
    assert fast_payload(rows.lines, rows.empty_bucket) is not None
    # ... then the team column (migration 0007): empty, NULL, for an event without tm.
    assert rows.lines[0].endswith("\t12\t1\tgpt-4o-mini\t10\t2\t3\t0\tusage\t0\t")
    old = event("acme", "charge", t=3, s=2)
    rows = decode_entries([("1-0", [x for kv in old.items() for x in kv])], Times()).rows
    assert not rows.usage and rows.lines[0].endswith("\t\t0" + "\t" * 7 + "0\t")


def test_the_usage_fields_are_the_event_formats() -> None:
    """sync/records.py's names and order are gateway/core/events.py's (once it has them)."""
    from gateway.core import events

    assert getattr(events, "USAGE_FIELDS", USAGE_FIELDS) == USAGE_FIELDS
    assert events.FIELDS + USAGE_FIELDS == FIELDS_EXT

"""v2 stream entries (gateway/core/events.py: one ``v2`` field, the values joined by tabs)
against v1 (field/value pairs) for the same events.

- Decoding (no servers): v1 and v2 of any entry give the sync job the same rows, COPY
  lines, days, levels' figures and rejections, and ``decode`` the same ``Event``; hostile
  values (tabs, newlines, backslashes, ``\\N``) included: an entry with a tab is written as
  v1 (``packed``), the rest as v2; bytes replies and v2 entries of no shape too.
- The ledger (Postgres): the same events as v1, as v2 and mixed give identical tables, byte
  for byte; redelivered after a crash mid-batch, nothing is lost or doubled.
- The scripts (Redis): ``audit_event`` writes v2, and v1 for a value with a tab or an
  integer Lua would render in exponent form; the rows hold the exact values.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.events import (
    FIELDS,
    LEVELS_FIELD,
    PACKED_FIELD,
    PACKED_SHAPES,
    TEAM_FIELD,
    USAGE_FIELDS,
    decode,
    packed,
    unpacked,
)
from gateway.core.redis_keys import KeySpace
from gateway.redisio.lua_scripts import assemble
from sync.batch import Decoded, decode_entries
from sync.records import TOKENS, USER, Times, careful_payload, fast_payload
from tests.support.pg import requires_postgres
from tests.sync.test_sync import event, scenario, worker, xadd_all
from tests.sync.test_usage_fields import usage_event

HOSTILE = ["a\tb", "line\nbreak", "cr\rx", "back\\slash", "\\N", "\\", "", " ", "é€😀", "\t"]
_VALUES = ["", "0", "7", "-3", "007", "9" * 30, "1795469836271", "2026-11", "charge",
           "refund", "grant", "nope", "org", "x y", *HOSTILE]  # fmt: skip


def flat(fields: dict[str, str]) -> list[str]:
    return [x for pair in fields.items() for x in pair]


def same(a: Decoded, b: Decoded) -> None:
    """Both decodings give the writer the same thing (flats compared as v1 lists)."""
    assert a.rows.lines == b.rows.lines
    assert a.rows.flats == b.rows.flats
    assert a.rows.days == b.rows.days
    assert a.rows.levels == b.rows.levels
    assert (a.rows.empty_bucket, a.rows.usage) == (b.rows.empty_bucket, b.rows.usage)
    assert a.rows.entry_ids == b.rows.entry_ids
    assert [i for i, _, _ in a.bad] == [i for i, _, _ in b.bad]
    assert a.vanished == b.vanished
    fast = fast_payload(a.rows.lines, a.rows.empty_bucket)
    assert fast == fast_payload(b.rows.lines, b.rows.empty_bucket)
    assert careful_payload(a.rows.flats, Times()) == careful_payload(b.rows.flats, Times())


def shaped(names: tuple[str, ...], values: list[str]) -> dict[str, str]:
    return dict(zip(names, values, strict=True))


@st.composite
def entries(draw: st.DrawFn) -> dict[str, str]:
    names = draw(st.sampled_from(list(PACKED_SHAPES.values())))
    base = event("acme", "charge", t=3, bal=9, x=0, a=10, used=1, s=4, rq="r1", st=200)
    base |= {n: "" for n in USAGE_FIELDS} | {TEAM_FIELD: "red", LEVELS_FIELD: "1 2 - 5 - -"}
    values = [base.get(n, "") for n in names]
    for i in draw(st.lists(st.integers(0, len(names) - 1), max_size=4)):
        values[i] = draw(st.sampled_from(_VALUES) | st.text(max_size=6))
    return shaped(names, values)


@settings(max_examples=400, deadline=None)
@given(st.lists(entries(), min_size=1, max_size=6), st.randoms())
def test_v1_and_v2_of_any_entries_decode_alike(events: list[dict[str, str]], rnd: Any) -> None:
    v1 = [(f"1-{i}", flat(e)) for i, e in enumerate(events)]
    v2 = [(f"1-{i}", flat(packed(e))) for i, e in enumerate(events)]
    # A mixed batch, as at upgrade time: each entry in either format.
    mixed = [rnd.choice(pair) for pair in zip(v1, v2, strict=True)]
    for e, (_, two) in zip(events, v2, strict=True):
        assert (two[0] == PACKED_FIELD) is not any("\t" in v for v in e.values())
        assert unpacked(two) == flat(e)
        try:
            expected: Any = decode(e)
        except Exception as exc:
            expected = type(exc)
        try:
            got: Any = decode(dict(zip(two[::2], two[1::2], strict=True)))
        except Exception as exc:
            got = type(exc)
        assert got == expected
    same(decode_entries(v1, Times()), decode_entries(v2, Times()))
    same(decode_entries(v1, Times()), decode_entries(mixed, Times()))


def test_a_value_with_a_tab_keeps_the_event_v1_and_other_hostile_values_go_v2() -> None:
    e = event("acme", "charge", u="ann\tbob", t=1, s=1)
    assert packed(e) == e
    for value in HOSTILE:
        if "\t" in value:
            continue
        ev = event("acme", "charge", u=value, ref=value, r=value, rq=value, t=1, s=1)
        two = packed(ev)
        assert list(two) == [PACKED_FIELD] and two[PACKED_FIELD].count("\t") == 20
        d1 = decode_entries([("1-0", flat(ev))], Times())
        d2 = decode_entries([("1-0", flat(two))], Times())
        same(d1, d2)
        assert d1.rows.flats[0][USER] == value  # u, exactly
    # A shape packed() does not know (a field missing) stays as it is.
    partial = {k: v for k, v in event("acme", "charge").items() if k != "ref"}
    assert packed(partial) == partial


def test_v2_as_bytes_and_as_mappings_decode_as_v1_does() -> None:
    e = usage_event("acme", t=9, rs=12, mdl="gpt-4o", ui=10, s=3) | {"tm": "blue"}
    two = packed(e)
    as_bytes = {k.encode(): v.encode() for k, v in two.items()}
    assert unpacked(as_bytes) == {k.encode(): v.encode() for k, v in e.items()}
    same(decode_entries([("1-0", flat(e))], Times()), decode_entries([("1-0", as_bytes)], Times()))
    same(decode_entries([("1-0", e)], Times()), decode_entries([("1-0", two)], Times()))
    assert decode(as_bytes) == decode(e) == decode(two)


def test_a_v2_entry_of_no_shape_is_rejected_not_raised() -> None:
    for values in ("only\tthree\tvalues", "\t".join(["x"] * 24), ""):
        got = decode_entries([("1-0", [PACKED_FIELD, values])], Times())
        assert len(got.rows) == 0 and [i for i, _, _ in got.bad] == ["1-0"]
        with pytest.raises(ValueError):
            decode({PACKED_FIELD: values})
    # Names of v2 are never those of v1: a v1 entry always starts with id.
    assert FIELDS[0] != PACKED_FIELD


# -- the ledger ---------------------------------------------------------------------------

# Every table the sync job writes, whole rows (as text, byte for byte).
TABLES = ("ai_token_usage_log", "ai_tokens", "organizations", "usage_daily",
          "usage_daily_user", "usage_daily_feature", "usage_daily_model")  # fmt: skip


async def dump(pool: asyncpg.Pool) -> dict[str, list[str]]:
    out = {}
    async with pool.acquire() as c:
        for table in TABLES:
            # The times of the sync itself (DEFAULT now()) aside; an org's created_at too.
            drop = "'id', 'synced_at', 'updated_at'" + (
                ", 'created_at'" if table == "organizations" else ""
            )
            rows = await c.fetch(f"SELECT (to_jsonb(t) - ARRAY[{drop}])::text FROM {table} t")
            out[table] = sorted(r[0] for r in rows)
    return out


async def reset(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as c:
        # usage_daily is a view of the ledger (0015): emptied with it.
        await c.execute(f"TRUNCATE {', '.join(t for t in TABLES if t != 'usage_daily')} CASCADE")


def varied_events() -> list[dict[str, str]]:
    """Resets, grants and requests of three orgs, then request events with usage fields,
    teams, levels' figures and hostile (tab-free) values."""
    events = scenario(["acme", "globex", "initech"], 40)
    for i in range(40):
        user = HOSTILE[i % len(HOSTILE)].replace("\t", "")
        e = usage_event("acme", t=4, rs=5, mdl=f"gpt-{i % 3}", ui=10 + i, uo=i, s=200 + i,
                        u=user, ts=events[-1]["ts"])  # fmt: skip
        if i % 2:
            e["tm"] = f"team-{i % 4}"
        if i % 5 == 0:
            e["tm"] = e.get("tm", "")
            e["lv"] = "a b - 1e 20 - key_k"
        events.append(e)
    return events


async def xadd_as(redis: Any, ks: KeySpace, events: list[dict[str, str]], v2: Any) -> None:
    """XADD each event to its org's shard, as v2 where ``v2(i)`` says so, else as v1."""
    pipe = redis.pipeline(transaction=False)
    for i, e in enumerate(events):
        pipe.xadd(ks.shard(e["o"]).events, packed(e) if v2(i) else e)
    await pipe.execute()


async def drain(w: Any) -> None:
    for _ in range(20):
        if (await w.run_once()).read == 0:
            return


@requires_postgres
async def test_v1_v2_and_mixed_streams_give_identical_tables(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    events = varied_events()
    dumps = {}
    for mode in ("v1", "v2", "mixed"):
        await reset(pool)
        ks = KeySpace(f"{keyspace.prefix}:{mode}", keyspace.shards)
        await xadd_as(redis, ks, events, lambda i, m=mode: m == "v2" or (m == "mixed" and i % 2))
        stream = await redis.xrange(ks.shard("acme").events)
        assert any(PACKED_FIELD in f for _, f in stream) is (mode != "v1")
        assert any("k" in f for _, f in stream) is (mode != "v2")
        w = worker(redis, pool, ks)
        await drain(w)
        dumps[mode] = await dump(pool)
        await w.close()
    assert len(dumps["v1"]["ai_token_usage_log"]) == len(events)
    assert dumps["v2"] == dumps["v1"]
    assert dumps["mixed"] == dumps["v1"]


@requires_postgres
async def test_v2_entries_of_a_crashed_consumer_and_redelivered_ones_land_once(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    events = varied_events()
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace)
    await drain(w)
    expected = await dump(pool)
    await w.close()
    await reset(pool)
    ks = KeySpace(f"{keyspace.prefix}:crash", keyspace.shards)
    await xadd_as(redis, ks, events, lambda i: True)
    for shard in ks.all_shards():
        await redis.xgroup_create(shard.events, "creditgate-sync", id="0", mkstream=True)
        # A consumer takes the first half of each shard's entries and dies mid-batch.
        await redis.xreadgroup("creditgate-sync", "crashed", {shard.events: ">"}, count=30)
    taken = [await redis.xpending(s.events, "creditgate-sync") for s in ks.all_shards()]
    assert sum(p["pending"] for p in taken) >= 30
    w = worker(redis, pool, ks, claim_idle_ms=1)
    await drain(w)
    left = [await redis.xpending(s.events, "creditgate-sync") for s in ks.all_shards()]
    assert sum(p["pending"] for p in left) == 0
    # Entries written but not acked (a crash between commit and ack) come again.
    await xadd_as(redis, ks, events[:50], lambda i: True)
    await drain(w)
    await w.close()
    assert await dump(pool) == expected


# -- the scripts --------------------------------------------------------------------------


def audit_script(names: tuple[str, ...], numbers: tuple[str, ...] = ()) -> str:
    """A script calling the prelude's ``audit_event`` with ARGV as the fields ``names``
    (nil for the usage fields when they are not there), those in ``numbers`` as Lua
    numbers, as the scripts pass balances and counts."""
    args = []
    for name in (*FIELDS, *USAGE_FIELDS, TEAM_FIELD, LEVELS_FIELD):
        if name not in names:
            args.append("nil")
            continue
        arg = f"ARGV[{names.index(name) + 1}]"
        args.append(f"tonumber({arg})" if name in numbers else arg)
    return assemble("audit", f"return audit_event(KEYS[1], {', '.join(args)})").source


@pytest.mark.parametrize("names", list(PACKED_SHAPES.values()), ids=lambda n: str(len(n)))
async def test_the_scripts_write_v2_and_v1_for_a_tab_or_an_exponent(
    redis: Any, keyspace: KeySpace, names: tuple[str, ...]
) -> None:
    stream = keyspace.shard("acme").events
    base = usage_event("acme", t=9, rs=12, mdl="gpt-4o", ui=10, s=3, bal=5, u="ann")
    base |= {TEAM_FIELD: "red", LEVELS_FIELD: "1 2 - 5 - -"}
    cases = [
        {},
        {"ref": "a\\b\nc\r", "r": "\\N", "u": "é€😀"},  # COPY-hostile, tab-free: v2
        {"ref": "x\ty"},  # a tab: v1
        {"tm": "red\t", "mdl": "\tgpt"},  # in whichever text value the shape has
        {"lv": "1\t2 - 5 - -", "u": "\t"},
        {"t": "1000000000000000"},  # 1e+15 from a Lua number: v1, in full
        {"bal": "-99999999999999"},  # 14 digits: %.14g renders it whole
    ]
    for change in cases:
        fields = {n: (base | change)[n] for n in names}
        v2 = fields["t"] != "1000000000000000" and not any("\t" in v for v in fields.values())
        script = audit_script(names, numbers=("t", "bal"))
        await redis.delete(stream)
        await redis.eval(script, 1, stream, *fields.values())
        [(_, got)] = await redis.xrange(stream)
        assert got == (packed(fields) if v2 else fields)
        assert (list(got) == [PACKED_FIELD]) is v2
        assert unpacked(got) == fields
        decoded = decode_entries([("1-0", flat(got))], Times())
        same(decoded, decode_entries([("1-0", flat(fields))], Times()))
        if fields["t"] == "1000000000000000":
            assert decoded.rows.flats[0][TOKENS] == "1000000000000000"

"""The compiled forms (sync/_entries.c, sync/compiled.py) against the Python ones: the
decode of a read of v2 entries against ``decode_each``, the rollups against
``rollups_each``, the newest snapshot events against ``_newest_each``.

``decode_entries`` takes the compiled pass when the extension is built and the read is all
v2 entries on the fast path; it must then answer exactly what ``decode_each`` (the pure
Python decode, itself checked against ``gateway.core.events.decode`` in
test_sync_decode.py) answers: the same values, ``COPY`` lines, days, levels' figures and
flags, for fixed-cost and usage events, with and without a team or ``lv``, with hostile
values. Any other read (v1, bytes, a vanished entry, a value the reference decode must see)
is answered None by the compiled pass and decoded entry by entry, with the same result.
The reductions: on any batch of values, the compiled pass answers the Python form's
columns (in the same order) or None (a value it does not read, such as a seq of more than
18 digits). The ledger tables written from v2 streams are byte for byte the same in both
forms (test_packed_entries.py's dump).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.events import KINDS, packed
from gateway.core.redis_keys import KeySpace
from gateway.usage.topscan import PURE_PYTHON_ENV
from sync import aggregate, compiled
from sync.batch import Decoded, Rows, decode_each, decode_entries
from sync.records import (
    ALLOC,
    BAL,
    BUCKET,
    EXTRA,
    FEATURE,
    KIND,
    MAX_DIGITS,
    ORG,
    PERIOD,
    SEQ,
    TOKENS,
    USED,
    USER,
    Times,
    fast_payload,
    org_order,
    org_order_each,
)
from tests.support.needs import under_ci
from tests.support.pg import requires_postgres
from tests.sync.test_packed_entries import HOSTILE, drain, dump, reset, varied_events, xadd_as
from tests.sync.test_sync import scenario, worker
from tests.sync.test_sync_decode import lua_entries

decode_v2: Any = compiled.decode_v2
needs_compiled = pytest.mark.skipif(decode_v2 is None, reason="sync._entries not built")


def _read(events: list[dict[str, str]]) -> list[Any]:
    """A read as the fast client returns it: [id, fields] lists, each fields a flat list."""
    return [
        [f"1-{i}", [x for pair in packed(e).items() for x in pair]] for i, e in enumerate(events)
    ]


def _same(a: Decoded, b: Decoded) -> None:
    assert a.rows.entry_ids == b.rows.entry_ids
    assert a.rows.fields == b.rows.fields
    assert a.rows.flats == b.rows.flats
    assert a.rows.lines == b.rows.lines
    assert a.rows.days == b.rows.days
    assert a.rows.levels == b.rows.levels
    assert (a.rows.empty_bucket, a.rows.usage) == (b.rows.empty_bucket, b.rows.usage)
    assert [(i, e) for i, _, e in a.bad] == [(i, e) for i, _, e in b.bad]
    assert a.vanished == b.vanished
    # What the compiled decode knows (no value to escape) needs no second look: the same
    # payload as fast_payload's checks give.
    assert not b.rows.clean
    if a.rows.clean:
        assert fast_payload(a.rows.lines, a.rows.empty_bucket, clean=True) == fast_payload(
            a.rows.lines, a.rows.empty_bucket
        )


def _producer_events(usage: bool, n: int = 300) -> list[dict[str, str]]:
    """Request events of a few orgs (``scenario``'s), with the usage fields settle.lua
    appends when ``usage``, a team on some and capped levels' figures on others."""
    orgs = [f"org{i}" for i in range(8)]
    requests = [e for e in scenario(orgs, n // 8 + 1) if e["k"] in ("charge", "refund")]
    events = []
    for i, e in enumerate(requests[:n]):
        if usage:
            ui, uo = 50 + i, 10 + i % 7
            e.update(rs=str(40 + i % 9), ov="0" if i % 5 else str(i), mdl=f"gpt-{i % 3}",
                     ui=str(ui), uc=str(ui // 2 if i % 2 else 0), uo=str(uo), ur="0",
                     cs="usage", um="" if i % 3 else "1")  # fmt: skip
        if i % 4 == 1:
            e["tm"] = f"team-{i % 3}"
        if i % 7 == 2:
            e["tm"] = e.get("tm", "")
            e["lv"] = "a b - 1e 20 - key_k"
        events.append(e)
    return events


# -- which form is loaded ---------------------------------------------------------------------


def test_ci_tests_the_compiled_form() -> None:
    """CI installs with a compiler (.ci/run): the extension must be built and in use there."""
    if not under_ci():
        pytest.skip("CI only: a local install may lack a compiler")
    assert compiled.COMPILED and decode_v2 is not None
    assert compiled.rollups is not None and compiled.newest is not None


def _compiled_in_child(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != PURE_PYTHON_ENV}
    if env_value is not None:
        env[PURE_PYTHON_ENV] = env_value
    code = "from sync import compiled; print(compiled.COMPILED)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_environment_switch_gives_the_pure_python_form(value: str) -> None:
    assert _compiled_in_child(value) == "False"


@needs_compiled
@pytest.mark.parametrize("value", [None, "", "0"])
def test_without_the_switch_the_compiled_form_is_used(value: str | None) -> None:
    assert _compiled_in_child(value) == "True"


# -- the answers ------------------------------------------------------------------------------


@needs_compiled
@pytest.mark.parametrize("usage", [False, True])
def test_the_usual_read_takes_the_compiled_pass_and_decodes_as_decode_each(usage: bool) -> None:
    entries = _read(_producer_events(usage))
    assert decode_v2(entries, Times(), KINDS, MAX_DIGITS) is not None
    got = decode_entries(entries, Times())
    _same(got, decode_each(entries, Times()))
    assert got.rows.usage is usage and got.rows.levels and not got.bad


@needs_compiled
def test_hostile_values_without_tabs_take_the_compiled_pass_exactly() -> None:
    events = []
    values = [v for v in (*HOSTILE, "\u00e9t\u00e9", "\U0001f600") if "\t" not in v]
    for i, value in enumerate(values):
        events.append(
            {**_producer_events(False, 1)[0], "id": f"e{i}", "u": value, "ref": value, "r": value}
        )
    entries = _read(events)
    assert decode_v2(entries, Times(), KINDS, MAX_DIGITS) is not None
    got = decode_entries(entries, Times())
    _same(got, decode_each(entries, Times()))
    # A backslash, a newline or a CR: not clean, so fast_payload looks (and refuses).
    assert not got.rows.clean and fast_payload(got.rows.lines, got.rows.empty_bucket) is None
    plain = decode_entries(_read(_producer_events(False)), Times()).rows
    assert plain.clean and Rows.concat([plain, plain]).clean and plain.slice(0, 5).clean
    assert not Rows.concat([plain, got.rows]).clean


@needs_compiled
@pytest.mark.parametrize(
    "odd",
    [
        "v1",  # an entry written as field/value pairs
        "vanished",  # deleted while pending
        "negative",  # a grant: t < 0 is decode's to check
        "kind",  # an unknown kind: rejected
        "shape",  # a v2 entry of no shape: rejected
        "surrogate",  # a value hiredis decoded with surrogateescape
        "bytes",  # a client without decoded replies
        "empty_t",  # t "" (written as "0" by the fast rendering)
    ],
)
def test_any_other_read_is_left_to_decode_each(odd: str) -> None:
    events = _producer_events(True, 20)
    entries = _read(events)
    e = dict(events[5])
    if odd == "v1":
        entries[5][1] = [x for pair in e.items() for x in pair]
    elif odd == "vanished":
        entries[5][1] = None
    elif odd == "negative":
        entries[5][1] = ["v2", packed({**e, "k": "grant", "t": "-30"})["v2"]]
    elif odd == "kind":
        entries[5][1] = ["v2", packed({**e, "k": "nope"})["v2"]]
    elif odd == "shape":
        entries[5][1] = ["v2", "a\tb\tc"]
    elif odd == "surrogate":
        entries[5][1] = ["v2", packed({**e, "u": "x\udcff"})["v2"]]
    elif odd == "bytes":
        entries[5][1] = [b"v2", packed(e)["v2"].encode()]
    elif odd == "empty_t":
        entries[5][1] = ["v2", packed({**e, "t": ""})["v2"]]
    answer = decode_v2(entries, Times(), KINDS, MAX_DIGITS)
    if odd == "empty_t":  # on the fast path too: t "" is rendered "0", as decode_each does
        assert answer is not None
    else:
        assert answer is None
    _same(decode_entries(entries, Times()), decode_each(entries, Times()))


@settings(max_examples=400, deadline=None)
@given(st.lists(lua_entries(), min_size=1, max_size=12), st.lists(st.booleans(), min_size=12))
def test_any_read_of_lua_shaped_entries_decodes_as_decode_each(
    events: list[dict[str, str]], with_levels: list[bool]
) -> None:
    """Reads of entries as the scripts write them (v2 where packed() says so, v1 for a value
    with a tab), with odd values here and there, and lv on some: the same answer."""
    for e, lv in zip(events, with_levels, strict=False):
        if lv:
            e.setdefault("tm", "")
            e["lv"] = "a b - 1e 20 - key_k"
    entries = _read(events)
    _same(decode_entries(entries, Times()), decode_each(entries, Times()))


# -- the ledger -------------------------------------------------------------------------------


@requires_postgres
@needs_compiled
async def test_v2_streams_give_identical_tables_in_both_forms(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = varied_events() + _producer_events(True, 200) + _producer_events(False, 200)
    dumps = {}
    for form in ("compiled", "pure", "v1"):
        if form != "compiled":
            for name in ("decode_v2", "rollups", "newest"):
                monkeypatch.setattr(compiled, name, None)
        await reset(pool)
        ks = KeySpace(f"{keyspace.prefix}:{form}", keyspace.shards)
        await xadd_as(redis, ks, events, lambda i, f=form: f != "v1")
        w = worker(redis, pool, ks)
        await drain(w)
        dumps[form] = await dump(pool)
        await w.close()
    assert len(dumps["compiled"]["ai_token_usage_log"]) == len(events)
    assert dumps["compiled"] == dumps["pure"] == dumps["v1"]


# -- the reductions ---------------------------------------------------------------------------

_INTS = ["", "0", "3", "12", "007", "-4", "9" * 18, "9" * 19, "1_0"]


@st.composite
def flats(draw: st.DrawFn) -> list[str]:
    """A batch's values: few orgs, buckets and users (keys repeat), odd integers now and
    then, some snapshot columns empty."""
    v = [""] * 21
    v[KIND] = draw(st.sampled_from(["charge", "refund", "expired_hold", "grant", "reset"]))
    v[ORG], v[BUCKET] = draw(st.sampled_from(["a", "b"])), draw(st.sampled_from(["x", "y", ""]))
    v[USER], v[FEATURE] = draw(st.sampled_from(["u", "", "\u00e9"])), draw(st.sampled_from("fg"))
    v[TOKENS], v[SEQ] = draw(st.sampled_from(_INTS)), draw(st.sampled_from(_INTS))
    for i in (BAL, EXTRA, ALLOC, USED, PERIOD):
        v[i] = draw(st.sampled_from(["", "5", "2026-11"]))
    return v


@needs_compiled
@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(flats(), st.sampled_from(["2026-11-14", "2026-11-15"])), max_size=40))
def test_the_compiled_reductions_answer_as_the_python_forms(
    batch_: list[tuple[list[str], str]],
) -> None:
    entries, days = [v for v, _ in batch_], [d for _, d in batch_]
    reduced = compiled.rollups(entries, days, aggregate.REQUEST_KINDS)
    try:
        expected = aggregate.rollups_each(entries, days)
    except ValueError:  # an int() the Python form refuses: the compiled one must not answer
        assert reduced is None
    else:
        if reduced is not None:
            assert [list(c) for c in reduced] == [list(c) for c in expected]
        assert [list(c) for c in aggregate.rollups(entries, days)] == [list(c) for c in expected]
    newest = compiled.newest(entries)
    try:
        full, partial = aggregate._newest_each(entries)
    except ValueError:
        assert newest is None
    else:
        if newest is not None:
            assert list(newest[0].items()) == list(full.items()) and newest[1] == partial
            assert all(newest[0][k] is full[k] for k in full)  # the events themselves


@needs_compiled
@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["o1", "o2", "o3", "", "é"]), max_size=40))
def test_the_compiled_org_order_answers_as_the_python_form(orgs: list[str]) -> None:
    entries = [["id", "charge", org, *[""] * 18] for org in orgs]
    expected = org_order_each(entries)
    got = compiled.org_order(entries)
    assert got == (True if expected is None else expected)
    assert org_order(entries) == expected


@needs_compiled
def test_the_usual_batch_takes_the_compiled_reductions() -> None:
    rows = decode_entries(_read(_producer_events(False)), Times()).rows
    assert compiled.rollups(rows.flats, rows.days, aggregate.REQUEST_KINDS) is not None
    assert compiled.newest(rows.flats) is not None
    assert compiled.org_order(rows.flats) is not None


@needs_compiled
def test_values_of_other_types_are_left_to_the_python_forms() -> None:
    """A Flat's values are str; anything else (a caller's mistake) gets None, never a crash."""
    v = [""] * 21
    v[KIND], v[SEQ], v[BUCKET], v[PERIOD] = "charge", "3", "b", "2026-11"
    v[BAL] = v[EXTRA] = v[ALLOC] = v[USED] = "1"
    for odd in (b"org", None, 7):
        w: list[Any] = list(v)
        w[ORG] = odd
        assert compiled.newest([w]) is None
        assert compiled.rollups([w], ["2026-11-15"], aggregate.REQUEST_KINDS) is None
        assert compiled.org_order([v, w]) is None
    assert compiled.newest([["short"]]) is None
    assert compiled.org_order([["short"]]) is None
    assert compiled.rollups([v], [], aggregate.REQUEST_KINDS) is None  # days out of step
    assert decode_v2([5, ("1-0", ["v2", "x"])], Times(), KINDS, MAX_DIGITS) is None


# -- shared values and runs of (org, day) (BENCHMARKS.md section 11j) -------------------------


@needs_compiled
@pytest.mark.parametrize("orgs", [8, 3000])
def test_a_reads_values_of_one_text_are_one_object(orgs: int) -> None:
    """The compiled decode gives the org, user, feature, bucket, tokens and route of one
    text one object per read (while its slot keeps it: 3,000 orgs overflow the table of
    1,024, and evicted texts are made again), and still answers as ``decode_each``."""
    events = [
        {**e, "o": f"org{i % orgs:05d}", "id": f"{e['id']}-{i}"}
        for i, e in enumerate(_producer_events(False, 300) * 12)
    ]
    entries = _read(events)
    got = decode_entries(entries, Times())
    _same(got, decode_each(entries, Times()))
    flats = got.rows.flats
    assert len({f[ORG] for f in flats}) == orgs
    if orgs < 100:  # else texts evict each other's slots: some made again, never wrong
        for column in (ORG, USER, FEATURE, BUCKET, TOKENS):
            assert len({id(f[column]) for f in flats}) == len({f[column] for f in flats})


def _fresh(text: str) -> str:
    """An equal str that is another object (slicing copies a str of 2 or more characters)."""
    return (text + ".")[:-1]


@needs_compiled
@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["o1", "o2", "o3"]),
            st.sampled_from(["u1", "u2", "\u00e9\u00e9"]),
            st.sampled_from(["f1", "f2"]),
            st.sampled_from(["2026-11-14", "2026-11-15"]),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_the_compiled_rollups_answer_as_the_python_form_in_any_order_of_orgs_and_days(
    batch_: list[tuple[str, str, str, str, bool]],
) -> None:
    """Runs of one (org, day) broken and resumed, equal texts as distinct objects or as one:
    the same columns in the same order, each key's values its first event's objects."""
    entries, days = [], []
    for org, user, feature, day, fresh in batch_:
        v = [""] * 21
        v[KIND], v[TOKENS], v[BUCKET] = "charge", "2", _fresh("b" + feature)
        v[ORG], v[USER], v[FEATURE] = (_fresh(x) if fresh else x for x in (org, user, feature))
        entries.append(v)
        days.append(_fresh(day) if fresh else day)
    reduced = compiled.rollups(entries, days, aggregate.REQUEST_KINDS)
    expected = aggregate.rollups_each(entries, days)
    assert reduced is not None
    assert [list(c) for c in reduced] == [list(c) for c in expected]
    for column in (0, 1, 2, 5, 6, 7):  # the keys: org, day, user; org, day, feature
        assert all(a is b for a, b in zip(reduced[column], expected[column], strict=True))

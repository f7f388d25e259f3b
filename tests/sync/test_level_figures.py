"""The capped levels' figures (``lv``) of request events: set aside by the decoder, the
rest decoded as before, and reduced per level for the cap alerts (no servers needed)."""

from __future__ import annotations

from typing import Any

import pytest

from sync.batch import Rows, decode_entries
from sync.levels import level_columns, without_levels
from sync.records import Times
from tests.sync.test_sync import event

ALL = frozenset({"team", "user", "key"})


def entry(lv: str | None = None, team: str | None = "red", **f: Any) -> list[str]:
    """A request event as the fast client returns it: a flat list, tm then lv last."""
    fields = event("acme", "charge", u="ann", t=3, bal=70, x=0, a=100, used=30, s=1, **f)
    if team is not None or lv is not None:
        fields["tm"] = team or ""
    if lv is not None:
        fields["lv"] = lv
    return [x for pair in fields.items() for x in pair]


def test_without_levels_takes_only_a_trailing_lv_off_lists_and_mappings() -> None:
    flat = entry("18 - - 1e - -")
    rest, lv = without_levels(flat)
    assert lv == "18 - - 1e - -" and rest == flat[:-2]
    plain = entry()
    assert without_levels(plain) == (plain, None)
    as_bytes = {k.encode(): v.encode() for k, v in zip(flat[::2], flat[1::2], strict=True)}
    rest_map, lv_map = without_levels(as_bytes)
    assert lv_map == "18 - - 1e - -" and b"lv" not in rest_map and b"tm" in rest_map


def test_decoded_entries_with_figures_make_the_same_rows_and_keep_the_figures_aside() -> None:
    times = Times()
    entries = [
        ("1-0", entry()),
        ("2-0", entry("18 9 - 1e a -")),
        ("3-0", entry("- a c - a f key_k", team=None)),
    ]
    plain = decode_entries([(i, entry()) for i, _ in entries], times).rows
    rows = decode_entries(entries, times).rows
    # The ledger rows' COPY lines do not change with the figures (ids aside).
    assert [line.split("\t", 1)[1] for line in rows.lines[:2]] == [
        line.split("\t", 1)[1] for line in plain.lines[:2]
    ]
    assert rows.levels == [
        (1, "18 9 - 1e a -"),
        (2, "- a c - a f key_k"),
    ]
    assert rows.lines[2].endswith("\t")  # tm '' is a NULL team, as for no team
    assert [i for i, _ in rows.slice(1, 3).levels] == [0, 1]
    assert rows.slice(0, 1).levels == []


def test_level_columns_keep_the_highest_used_per_level_and_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    times = Times()
    entries = [
        ("1-0", entry("15 7 - 1e a -")),  # hexadecimal: 21 and 7 of 30 and 10
        ("2-0", entry("18 8 3 1e a f key_k")),
        ("3-0", entry("12 6 0 1e a -")),  # a refund: the max stays
        ("4-0", entry("1b 9 - 3c a -")),  # cap raised (60): its own row
        ("5-0", entry("1e 18 garbage")),  # malformed: skipped, never fails the batch
        ("6-0", entry("- 30@2026-10 - - a -")),  # the older form, last period's: 0 now
        ("7-0", entry("- x9 - - a -")),  # malformed numbers: skipped
        ("8-0", entry("- 5 - - a 9")),  # a capped key without its id: malformed
        ("9-0", entry("0 4@2026-11 0 - a -")),  # the older form, this period's: 4
    ]
    rows = decode_entries(entries, times).rows
    cols = level_columns(rows.flats, rows.levels, ALL)
    # The malformed ones are said, not silently dropped.
    assert "3 events' capped-level figures (lv) were malformed" in caplog.text
    got = sorted(zip(*cols, strict=True))
    assert got == [
        ("acme", "key", "key_k", "lead_generation", "2026-11", 15, 3),
        ("acme", "team", "red", "lead_generation", "2026-11", 30, 24),
        ("acme", "team", "red", "lead_generation", "2026-11", 60, 27),
        ("acme", "user", "ann", "lead_generation", "2026-11", 10, 9),
    ]
    only_users = level_columns(rows.flats, rows.levels, frozenset({"user"}))
    assert only_users[1] == ["user"] and only_users[6] == [9]
    assert level_columns(rows.flats, rows.levels, frozenset()) == ([],) * 7


def test_concatenated_rows_keep_every_parts_figures_at_their_rows() -> None:
    # Several shards' reads written in one transaction (sync/worker.py fold): the figures
    # still point at their own events.
    times = Times()
    first = decode_entries([("1-0", entry()), ("2-0", entry("3 - - 1e - -"))], times).rows
    second = decode_entries([("1-0", entry("6 - - 1e - -")), ("2-0", entry())], times).rows
    both = Rows.concat([first, second])
    assert both.levels == [(1, "3 - - 1e - -"), (2, "6 - - 1e - -")]
    assert [both.entry_ids[i] for i, _ in both.levels] == ["2-0", "1-0"]

"""One batch of stream entries, decoded: what the writer needs and what the worker acks.

``decode_entries`` turns the entries of one read (a shard's XREADGROUP or XAUTOCLAIM)
into ``Rows`` (the well-formed ones: canonical entries, ``COPY`` lines and UTC days) and the
malformed ones with their error. The worker acks every entry of the read once the rows
are committed and the malformed ones dead-lettered.

Entries come in two formats (gateway/core/events.py), in any mix: v2 (one ``v2`` field,
the values joined by tabs) is split, and its values are the ``Flat`` (sync/records.py); a
v1 entry (field/value pairs) gives the same ``Flat`` once its names are checked. From there
both take the same checks and renderings, so the same event gives the same row whichever
was written.

A read of v2 entries decoded on the fast path (every entry in a known shape, no value the
reference decode must look at: the usual read) is decoded in one pass by the C extension
when it is in use (sync/compiled.py ``decode_v2``): it answers exactly what
``decode_each`` answers for the same read, or None (anything else), and ``decode_each``
then decodes it entry by entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.core.events import (
    KINDS,
    LEVELS_FIELD,
    PACKED_FIELD,
    PACKED_SHAPES,
    SEPARATOR,
    unpacked,
)
from sync import compiled
from sync.levels import without_levels
from sync.records import (
    BUCKET,
    FIELD_LIST,
    FIELD_LIST_EXT,
    FIELD_LIST_EXT_TEAM,
    FIELD_LIST_TEAM,
    ID,
    MAX_DIGITS,
    NO_USAGE,
    TEAMED,
    USAGE_AT,
    Fields,
    Flat,
    Times,
    canonical,
    checked,
    reference_flat,
    usage_fast,
    usage_line,
)

# (entry id, fields); fields is empty when the entry was deleted while pending. The fast
# client's reply gives each entry as a two-item list, which unpacks the same.
Entry = tuple[str, Fields]

# A v2 entry's number of values -> whether its last value is lv, set aside as a v1
# entry's is (sync/levels.py).
_SHAPES: dict[int, bool] = {n: names[-1] == LEVELS_FIELD for n, names in PACKED_SHAPES.items()}


@dataclass(slots=True)
class Rows:
    """Well-formed entries of a batch, in stream order (parallel lists)."""

    entry_ids: list[str] = field(default_factory=list)
    fields: list[Fields] = field(default_factory=list)  # as read, for the dead-letter copy
    flats: list[Flat] = field(default_factory=list)  # canonical (sync/records.py)
    lines: list[str] = field(default_factory=list)  # fast COPY rendering
    days: list[str] = field(default_factory=list)  # UTC day of each event, ISO
    empty_bucket: bool = False  # some entry has b = "" (the fast rendering cannot say it)
    usage: bool = False  # some entry has the usage fields (sync/records.py)
    # The capped levels' figures of request events (sync/levels.py): (index in flats, lv).
    levels: list[tuple[int, str]] = field(default_factory=list)
    # No value holds a newline, a carriage return, a backslash or a tab: the fast rendering
    # is exact without looking (sync/records.py fast_payload). Known by the compiled
    # decode (it reads every byte); False: not known, fast_payload looks.
    clean: bool = False

    def __len__(self) -> int:
        return len(self.flats)

    @classmethod
    def concat(cls, parts: Sequence[Rows]) -> Rows:
        """The rows of ``parts``, one after the other (several shards' reads written in
        one transaction, see sync/worker.py)."""
        out = cls()
        for part in parts:
            # The figures' indices are into the part's flats: shifted past the parts before.
            at = len(out.flats)
            out.levels.extend([(at + i, lv) for i, lv in part.levels] if at else part.levels)
            out.entry_ids.extend(part.entry_ids)
            out.fields.extend(part.fields)
            out.flats.extend(part.flats)
            out.lines.extend(part.lines)
            out.days.extend(part.days)
            out.empty_bucket = out.empty_bucket or part.empty_bucket
            out.usage = out.usage or part.usage
        out.clean = bool(parts) and all(part.clean for part in parts)
        return out

    def slice(self, start: int, stop: int) -> Rows:
        """Entries ``start:stop`` (the worker bisects a batch Postgres rejects)."""
        part = Rows(
            self.entry_ids[start:stop],
            self.fields[start:stop],
            self.flats[start:stop],
            self.lines[start:stop],
            self.days[start:stop],
        )
        part.empty_bucket = self.empty_bucket and any(not f[BUCKET] for f in part.flats)
        part.usage = self.usage and any(len(f) > USAGE_AT for f in part.flats)
        part.levels = [(i - start, lv) for i, lv in self.levels if start <= i < stop]
        part.clean = self.clean
        return part


@dataclass(slots=True)
class Decoded:
    """A read, decoded."""

    rows: Rows
    bad: list[tuple[str, Fields, str]]  # malformed: entry id, fields, error
    vanished: int  # pending entries whose content was already trimmed


def decode_entries(entries: Sequence[Entry], times: Times) -> Decoded:
    """Decode a read; a malformed entry is reported in ``bad``, never raised."""
    decode_v2 = compiled.decode_v2
    if decode_v2 is not None and type(entries) is list:
        got = decode_v2(entries, times, KINDS, MAX_DIGITS)
        if got is not None:
            ids, fields, flats, lines, days, empty_bucket, usage, levels, clean = got
            rows = Rows(ids, fields, flats, lines, days, empty_bucket, usage, levels, clean)
            return Decoded(rows, [], 0)
    return decode_each(entries, times)


def decode_each(entries: Sequence[Entry], times: Times) -> Decoded:
    """Decode a read entry by entry (any format and shape; ``decode_entries`` takes a
    faster way for the usual read, with the same result)."""
    rows = Rows()
    bad: list[tuple[str, Fields, str]] = []
    vanished = 0
    # The loop runs once per event: locals and bound methods, and canonical()'s check
    # inlined for the usual entry (sync/records.py says what it checks and why).
    add_id, add_fields, add_flat, add_line, add_day = (
        rows.entry_ids.append, rows.fields.append, rows.flats.append, rows.lines.append,
        rows.days.append,
    )  # fmt: skip
    cached, names, join = times.cache.get, FIELD_LIST, "\t".join
    ext_names, no_usage, teamed = FIELD_LIST_EXT, NO_USAGE, TEAMED
    # With a team (contract A10): one more list comparison, only for those entries.
    team_names, ext_team_names = FIELD_LIST_TEAM, FIELD_LIST_EXT_TEAM
    levels_name = LEVELS_FIELD
    packed_name, sep, shapes = PACKED_FIELD, SEPARATOR, _SHAPES
    empty_bucket = usage = False
    for entry_id, fields in entries:
        if not fields:
            vanished += 1
            continue
        figures = None
        try:
            f: Flat
            if type(fields) is list and len(fields) == 2 and fields[0] == packed_name:
                # v2 (gateway/core/events.py): the values, split, are the Flat. Then the
                # same checks as a v1 entry's.
                f = fields[1].split(sep)
                lv = shapes.get(len(f))
                if lv is None:
                    f = canonical(fields)  # raises as decode does
                else:
                    if lv:
                        figures = f.pop()
                    if (len(f) > USAGE_AT and not usage_fast(f)) or not checked(f):
                        f = reference_flat(fields)
            elif type(fields) is list and (
                (got := fields[::2]) == names
                or got == team_names
                or (got in (ext_names, ext_team_names) and usage_fast(fields[1::2]))
            ):
                f = fields[1::2]
                if not checked(f):
                    f = reference_flat(fields)
            elif type(fields) is list and got[-1] == levels_name:
                # An entry with capped levels ends with their figures (lv): set aside,
                # the rest is an entry like any other (sync/levels.py).
                figures = fields[-1]
                f = canonical(fields[:-2])
            else:
                core, figures = without_levels(unpacked(fields))
                f = canonical(core)
            hit = cached(f[13]) or times[f[13]]
        except Exception as exc:  # any decode failure is the entry's, not ours
            bad.append((entry_id, fields, f"decode: {type(exc).__name__}: {exc}"))
            continue
        if not f[5]:
            empty_bucket = True
        add_id(entry_id)
        add_fields(fields)
        add_flat(f)
        if figures is not None:
            rows.levels.append((len(rows.flats) - 1, figures))
        # copy_line(f, hit[0]), inlined.
        if len(f) > USAGE_AT:
            usage = True
            tail = usage_line(f)
        else:
            tail = no_usage
        line = join((f[0], f[1], f[2], f[3], f[4], f[5], f[6] or "0", f[7], f[8], f[12] or "0",
                     hit[0], f[14], f[15], f[16], f[17], f[18], f[19], f[20]))  # fmt: skip
        line += tail
        add_line(line + f[-1] if len(f) in teamed else line)
        add_day(hit[1])
    rows.empty_bucket = empty_bucket
    rows.usage = usage
    return Decoded(rows, bad, vanished)


def first_of_each(rows: Rows, event_ids: set[str]) -> tuple[list[Flat], list[str]]:
    """The entries and days of the rows whose event id is in ``event_ids`` (the ones the
    ledger inserted), each id once: its first entry, as ``INSERT ... ON CONFLICT`` keeps."""
    wanted = set(event_ids)
    flats: list[Flat] = []
    days: list[str] = []
    for f, day in zip(rows.flats, rows.days, strict=True):
        if f[ID] in wanted:
            wanted.discard(f[ID])
            flats.append(f)
            days.append(day)
    return flats, days


def text(value: Any) -> str:
    """A reply value as str (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)

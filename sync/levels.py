"""The capped levels' figures that request events carry, for the cap alerts (contract A11).

A request event whose hold drew from team, user or API-key caps (contract A10) ends with
``lv``: each level's counter after the event and its cap as charge.lua applied it
(``lua/_prelude.lua`` ``level_figures``; the caps part is the hold's ``lx``)::

    lv = "<team counter> <user counter> <key counter> <team cap> <user cap> <key cap>[ <key id>]"

Counters and caps are hexadecimal integers, as the org hash holds them (lua/charge.lua
"Levels"); a cap is ``-`` for a level without one, and then its counter means nothing
(``-``, ``0`` or a value). The key id follows when the key is capped. The counters are
those of the event's period (the scripts send no figures when the counters count another
one); a counter in the form written before, ``<used>@<period>`` in decimal, counts only
in its own period. The team is the event's ``tm``, the user its ``u``. The field is not a
ledger column: the decoder
(sync/batch.py) takes it off the entry with :func:`without_levels` before the entry is
canonicalised, so the ledger row, the fast ``COPY`` path and every other reader see the
entry they always did, and keeps it aside in ``Rows.levels``. Events without caps carry
no ``lv``, so an org without caps costs nothing here.

:func:`level_columns` reduces a batch's figures to one row per (org, level, id, bucket,
period, cap), the highest used, which ``gateway/alerts/levels.py`` evaluates against the
thresholds in the batch's transaction (:func:`write_cap_alerts`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.alerts.evaluation import AlertDefaults
from gateway.alerts.levels import CAP_ALERTS, CAP_LEVELS
from gateway.core.events import LEVELS_FIELD
from sync.records import BUCKET, ORG, PERIOD, TEAMED, USER, Fields, Flat

__all__ = ["LEVELS_FIELD", "level_columns", "without_levels", "write_cap_alerts"]

_LEVELS_BYTES = LEVELS_FIELD.encode()
# Caps and counters are integers below 2**53 (gateway/core/caps.py MAX_CAP): 14 hexadecimal
# digits; anything longer is not a figure the scripts wrote (and could overflow a bigint).
_MAX_HEX = 15
_MAX_USED = 16**_MAX_HEX

log = logging.getLogger("creditgate.sync")

LevelColumns = tuple[list[str], list[str], list[str], list[str], list[str], list[int], list[int]]


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


def without_levels(fields: Fields) -> tuple[Fields, str | None]:
    """The entry without its trailing ``lv`` field, and that field's value (None when the
    entry has none: then ``fields`` itself is returned)."""
    # A list (the fast client's reply) first: isinstance of an ABC costs more than the rest.
    if type(fields) is list:
        if len(fields) >= 2 and fields[-2] in (LEVELS_FIELD, _LEVELS_BYTES):
            return fields[:-2], _text(fields[-1])
        return fields, None
    if isinstance(fields, Mapping):
        for name in (LEVELS_FIELD, _LEVELS_BYTES):
            if name in fields:
                rest = {k: v for k, v in fields.items() if k != name}
                return rest, _text(fields[name])
        return fields, None
    if len(fields) >= 2 and fields[-2] in (LEVELS_FIELD, _LEVELS_BYTES):
        return list(fields[:-2]), _text(fields[-1])
    return fields, None


def _cap(text: str) -> int | None:
    """A cap's tokens from its hexadecimal figure (None: not one the scripts write)."""
    if len(text) > _MAX_HEX or not text.isalnum() or not text.isascii():
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def _used(counter: str, period: str) -> int:
    """What a level drew in ``period`` (the event's) from its counter: hexadecimal, or
    ``<used>@<period>`` in decimal as written before (another period's: 0). Raises
    ValueError for a malformed one."""
    if "@" not in counter:
        if len(counter) > _MAX_HEX or not counter.isalnum():
            raise ValueError(counter)
        return int(counter, 16)
    used, _, per = counter.partition("@")
    if not used.isdigit() or not used.isascii():
        raise ValueError(counter)
    return int(used) if per == period else 0


def level_columns(
    flats: Sequence[Flat], levels: Sequence[tuple[int, str]], enabled: frozenset[str]
) -> LevelColumns:
    """Per (org, level, id, bucket, period, cap) the highest used of the batch's figures
    (``levels``: index into ``flats``, ``lv`` value), for the levels in ``enabled``, as the
    statement's columns. Malformed figures are skipped: an alert is never worth failing
    the batch (the ledger rows) over."""
    # Once per capped event: caps stay strings in the key (checked once per key at the
    # end), used is compared as an int.
    best: dict[tuple[str, str, str, str, str, str], int] = {}
    get = best.get
    team_on, user_on, key_on = "team" in enabled, "user" in enabled, "key" in enabled
    malformed = 0
    for index, figures in levels:
        parts = figures.split(" ")
        if len(parts) == 7:
            tn, un, kn, tc, uc, kc, key_id = parts
        elif len(parts) == 6 and parts[5] == "-":
            tn, un, kn, tc, uc, kc = parts
            key_id = ""
        else:
            malformed += 1
            continue
        f = flats[index]
        org, bucket, period = f[ORG], f[BUCKET], f[PERIOD]
        try:
            if team_on and tc != "-" and len(f) in TEAMED and f[-1]:
                k = (org, "team", f[-1], bucket, period, tc)
                used = _used(tn, period)
                if used > get(k, -1):
                    best[k] = used
            if user_on and uc != "-" and f[USER]:
                k = (org, "user", f[USER], bucket, period, uc)
                used = _used(un, period)
                if used > get(k, -1):
                    best[k] = used
            if key_on and kc != "-" and key_id:
                k = (org, "key", key_id, bucket, period, kc)
                used = _used(kn, period)
                if used > get(k, -1):
                    best[k] = used
        except ValueError:
            malformed += 1
            continue
    if malformed:
        # Not the batch's failure (its rows are fine), but cap alerts are being missed.
        log.warning("%d events' capped-level figures (lv) were malformed; skipped", malformed)
    cols: LevelColumns = ([], [], [], [], [], [], [])
    for (org, level, ident, bucket, period, cap_text), used in best.items():
        cap = _cap(cap_text)
        if cap is None or used > _MAX_USED:
            continue
        cols[0].append(org)
        cols[1].append(level)
        cols[2].append(ident)
        cols[3].append(bucket)
        cols[4].append(period)
        cols[5].append(cap)
        cols[6].append(used)
    return cols


async def write_cap_alerts(
    conn: asyncpg.Connection | PoolConnectionProxy,
    flats: Sequence[Flat],
    levels: Sequence[tuple[int, str]],
    alerts: AlertDefaults,
) -> int:
    """Evaluate a batch's level figures (``Rows.flats``, ``Rows.levels``) in the batch's
    transaction (``conn``); returns the alert events inserted. Call it after the snapshot
    update (the payload's ``refresh_at`` is the bucket's snapshot)."""
    if not levels:
        return 0
    # Every cap level, whatever the config's default: an org's rule may watch one the
    # default leaves out; the statement keeps each row by its own org's levels.
    cols = level_columns(flats, levels, CAP_LEVELS)
    if not cols[0]:
        return 0
    pct, abs_, has_url = alerts.params()[:3]
    inserted = await conn.fetchval(CAP_ALERTS, *cols, pct, abs_, has_url, alerts.default_levels)
    return int(inserted or 0)

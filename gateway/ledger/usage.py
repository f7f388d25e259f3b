"""Usage statistics and the audit trail, read from Postgres for the token and admin APIs:
the names callers import, each defined in the module of its concept.

- :mod:`gateway.ledger.org_scope`: ``org_reader``, the read-only transaction scoped to one
  org (row-level security) that every read acting for one org runs in;
- :mod:`gateway.ledger.usage_stats`: one org's usage by feature, user, day and model and
  its forecast (``GET /stats``), from the daily rollups;
- :mod:`gateway.ledger.usage_groups`: one org's usage by team or user (``/stats?group=``);
- :mod:`gateway.ledger.usage_log`: the audit trail a page at a time (``GET /usage``, its
  cursors) and a period's overage per bucket (``GET /balance``);
- :mod:`gateway.ledger.org_listings`: every org's usage over its own current period
  (``GET /admin/orgs``, ``OrgPeriods``);
- :mod:`gateway.ledger.usage_window`: every org's usage over a window (``GET /admin/usage``);
- :mod:`gateway.ledger.usage_items`: the item shapes the stats and the window share.
"""

from __future__ import annotations

from gateway.ledger.org_listings import OrgPeriods, orgs_by_id, top_spenders
from gateway.ledger.org_scope import org_reader
from gateway.ledger.usage_log import decode_cursor, encode_cursor, period_overage, usage_page
from gateway.ledger.usage_stats import BURN_DAYS, TOP_USERS, forecast, org_stats, org_usage
from gateway.ledger.usage_window import window_usage

__all__ = [
    "BURN_DAYS",
    "TOP_USERS",
    "OrgPeriods",
    "decode_cursor",
    "encode_cursor",
    "forecast",
    "org_reader",
    "org_stats",
    "org_usage",
    "orgs_by_id",
    "period_overage",
    "top_spenders",
    "usage_page",
    "window_usage",
]

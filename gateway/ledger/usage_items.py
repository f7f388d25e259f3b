"""The shapes of usage items shared by one org's stats and every org's window: a
(key, requests, tokens) item and a model's item with its usage sums."""

from __future__ import annotations

from typing import Any

import asyncpg

__all__ = ["MODEL_SUMS", "by_model", "model_item", "usage_item"]

# The sums of a usage_daily_model row (or of a group of them), in model-item order.
MODEL_SUMS = (
    "requests", "tokens", "input_tokens", "cached_input_tokens", "output_tokens",
    "reasoning_tokens", "overage", "usage_missing",
)  # fmt: skip


def usage_item(key: str, value: Any, requests: int, tokens: int) -> dict[str, Any]:
    """``{key: value, "requests": .., "tokens": ..}`` (sums from Postgres come as Decimal)."""
    return {key: value, "requests": int(requests), "tokens": int(tokens)}


def model_item(model: str, r: asyncpg.Record) -> dict[str, Any]:
    """One model's usage (``r`` has the sums); ``model`` None for requests that reported
    none (``''`` in the rollup)."""
    item: dict[str, Any] = {"model": model or None}
    for name in MODEL_SUMS:
        item["usage_missing_requests" if name == "usage_missing" else name] = int(r[name])
    return item


def by_model(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model items that had requests, most tokens first."""
    items = [i for i in items if i["requests"]]
    items.sort(key=lambda i: (-i["tokens"], -i["requests"], i["model"] or ""))
    return items

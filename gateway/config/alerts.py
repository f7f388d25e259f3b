"""The ``alerts`` section (contract A11): its schema, its thresholds and its meaning checks.

A threshold is a share of the bucket used (``80``, ``"87.5%"``: percent, more than 0 and
at most 100) or an absolute number of tokens used (``{tokens: 500}``). Percent is of what
the bucket had this period, used + remaining (plan and purchased tokens), so a top-up
lowers it and a reset sets it to 0.

Delivery settings are operational extensions of A11: how long and how often a delivery
is retried, its HTTP timeout, and after how many days of continuous failure an endpoint
is disabled.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ALERT_LEVELS",
    "DEFAULT_THRESHOLDS",
    "AlertsConfig",
    "Threshold",
    "alerts_errors",
    "levels_errors",
    "parse_thresholds",
]

DEFAULT_THRESHOLDS: tuple[Any, ...] = (80, 100)
# What threshold alerts can watch: an org's buckets, and the caps of its teams, users and
# API keys (contract A10). All by default: the contract's thresholds are "of each bucket
# and each cap", and an org without caps has no cap to alert on.
ALERT_LEVELS: tuple[str, ...] = ("org", "team", "user", "key")
SECRET_PREFIX = "whsec_"


class AlertsConfig(BaseModel):
    """``alerts:``: defaults of every org's alert rules and how deliveries are made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook_url: str | None = None
    webhook_secret: str
    thresholds: list[Any] = Field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    levels: list[Any] = Field(default_factory=lambda: list(ALERT_LEVELS))
    forecast: bool = True
    timeout_seconds: float = 10.0
    retry_hours: float = 24.0
    retry_first_seconds: float = 30.0
    retry_max_seconds: float = 4 * 3600.0
    disable_after_days: float = 5.0
    poll_seconds: float = 1.0
    forecast_every_seconds: float = 300.0
    concurrency: int = 16
    # Delivered and failed events older than this are deleted by the deliverer
    # (gateway/alerts/retention.py); null keeps them forever.
    retention_days: float | None = 30.0

    @field_validator("webhook_url")
    @classmethod
    def _unset_url(cls, value: str | None) -> str | None:
        # `${CREDITGATE_ALERT_URL}` left unset: no default endpoint (orgs may set their own).
        return value or None


@dataclass(frozen=True, slots=True)
class Threshold:
    """One parsed threshold: ``unit`` percent (of used + remaining) or tokens (used)."""

    unit: Literal["percent", "tokens"]
    value: Decimal

    @property
    def key(self) -> str:
        """Its text in the outbox key: ``80%`` or ``500``."""
        return f"{_plain(self.value)}%" if self.unit == "percent" else _plain(self.value)

    def as_json(self) -> Any:
        """As the admin API shows it (the config's spelling)."""
        number = int(self.value) if self.value == int(self.value) else float(self.value)
        return number if self.unit == "percent" else {"tokens": number}


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _percent(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueError(f"expected a percent or {{tokens: N}}, got {str(value).lower()}")
    try:
        number = Decimal(str(value).strip().removesuffix("%").strip())
    except InvalidOperation:
        raise ValueError(
            f'expected a percent (80, "87.5%") or {{tokens: N}}, got {value!r}'
        ) from None
    if not number.is_finite() or not 0 < number <= 100:
        raise ValueError(f"a percent must be more than 0 and at most 100, got {value!r}")
    return number


def parse_threshold(value: Any) -> Threshold:
    """One threshold from the config or the admin API; raises ValueError in words."""
    if isinstance(value, dict):
        if set(value) != {"tokens"}:
            raise ValueError(f"an absolute threshold is {{tokens: N}}, got keys {sorted(value)}")
        tokens = value["tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
        return Threshold("tokens", Decimal(tokens))
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"a percent must be finite, got {value!r}")
    if not isinstance(value, int | float | str):
        raise ValueError(f"expected a percent or {{tokens: N}}, got {value!r}")
    return Threshold("percent", Decimal(_plain(_percent(value))))


def parse_thresholds(
    values: Sequence[Any], err: Callable[[int, str], None] | None = None
) -> list[Threshold]:
    """Every threshold that parses; each problem reported as ``err(index, message)``
    (duplicates too). Without ``err`` the first problem raises ValueError."""
    out: list[Threshold] = []
    seen: set[str] = set()
    for i, value in enumerate(values):
        try:
            threshold = parse_threshold(value)
            if threshold.key in seen:
                raise ValueError(f"duplicate threshold {threshold.key}")
        except ValueError as exc:
            if err is None:
                raise ValueError(f"thresholds[{i}]: {exc}") from None
            err(i, str(exc))
            continue
        seen.add(threshold.key)
        out.append(threshold)
    return out


def secret_problem(secret: str) -> str | None:
    """Why a Standard Webhooks secret (``whsec_`` + base64) is unusable, or None."""
    if not secret.startswith(SECRET_PREFIX):
        return "must start with whsec_ (a Standard Webhooks secret: whsec_ + base64)"
    try:
        text = secret[len(SECRET_PREFIX) :].rstrip("=")
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return "the part after whsec_ must be base64"
    if len(key) < 16:
        return f"the key must be at least 16 bytes (24 to 64 recommended), got {len(key)}"
    return None


def levels_errors(levels: Sequence[Any], path: str = "alerts.levels") -> list[tuple[str, str]]:
    """Problems of a list of levels (``alerts.levels``, or an org's rule under ``path``) as
    (key path, message): each one of :data:`ALERT_LEVELS`, none twice, at least one."""
    errors: list[tuple[str, str]] = []
    if not levels:
        errors.append((path, f"name at least one of {', '.join(ALERT_LEVELS)}"))
    seen: set[str] = set()
    for i, level in enumerate(levels):
        if not isinstance(level, str) or level not in ALERT_LEVELS:
            errors.append(
                (f"{path}[{i}]", f"must be one of {', '.join(ALERT_LEVELS)}, got {level!r}")
            )
        elif level in seen:
            errors.append((f"{path}[{i}]", f"duplicate level {level}"))
        else:
            seen.add(level)
    return errors


def alerts_errors(alerts: AlertsConfig) -> list[tuple[str, str]]:
    """Meaning checks of the section, as (key path, message); URL syntax is the caller's."""
    errors: list[tuple[str, str]] = []
    if alerts.webhook_secret.strip():
        problem = secret_problem(alerts.webhook_secret)
        if problem:
            errors.append(("alerts.webhook_secret", problem))
    parse_thresholds(
        alerts.thresholds, lambda i, msg: errors.append((f"alerts.thresholds[{i}]", msg))
    )
    errors.extend(levels_errors(alerts.levels))
    for key in (
        "timeout_seconds", "retry_hours", "retry_first_seconds", "retry_max_seconds",
        "disable_after_days", "poll_seconds", "forecast_every_seconds",
    ):  # fmt: skip
        value = getattr(alerts, key)
        if not (value > 0 and math.isfinite(value)):
            errors.append((f"alerts.{key}", f"must be positive, got {value}"))
    if alerts.retry_first_seconds > alerts.retry_max_seconds:
        errors.append(
            (
                "alerts.retry_first_seconds",
                f"must not exceed retry_max_seconds ({alerts.retry_max_seconds}),"
                f" got {alerts.retry_first_seconds}",
            )
        )
    days = alerts.retention_days
    if days is not None and not (days > 0 and math.isfinite(days)):
        errors.append(("alerts.retention_days", f"must be positive (or null: keep), got {days}"))
    if not 1 <= alerts.concurrency <= 1000:
        errors.append(("alerts.concurrency", f"must be 1 to 1000, got {alerts.concurrency}"))
    return errors

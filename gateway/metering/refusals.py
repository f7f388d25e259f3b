"""How a refused admission is answered: one description shared by the proxy/middleware
(problem+json on the wire) and the token API's ``/deduct`` (ApiError), so both give the
same status, code, title, detail, headers and facts (contract A3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.metering.meter import Admission

REFUSALS = {
    "not_in_plan": (403, "feature_not_in_plan", "Feature not in plan"),
    "insufficient": (402, "insufficient_tokens", "Not enough tokens"),
    "rate_limited": (429, "rate_limited", "Rate limit exceeded"),
    "in_flight": (409, "idempotency_conflict", "Request with this Idempotency-Key in progress"),
    "replay": (409, "idempotency_conflict", "Idempotency-Key already used"),
    "reused": (422, "idempotency_key_reused", "Idempotency-Key reused for another request"),
}
# How soon a client may retry a request whose Idempotency-Key is in flight (seconds).
IN_FLIGHT_RETRY_AFTER = 1
_UNREPLAYABLE = {
    "too_large": "its response body was larger than the replay limit",
    "streamed": "its response was streamed",
}


@dataclass(slots=True)
class Refusal:
    """A refused admission's answer."""

    status: int
    code: str
    title: str
    detail: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def seconds(ms: int | None) -> int:
    """Milliseconds to whole seconds, rounded up (Retry-After and RateLimit-Reset)."""
    return 0 if not ms else -(-ms // 1000)


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC with a Z."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def describe_refusal(adm: Admission) -> Refusal:
    """The answer to a refused admission (any status but ok)."""
    status, code, title = REFUSALS[adm.status]
    out = Refusal(status, code, title, "", facts={"feature": adm.feature, "cost": adm.cost})
    if adm.status == "insufficient":
        # contract A10: the level that refused (org, team, user or key) and its figures,
        # after the members answered before (balance stays the org's bucket balance).
        out.facts.update(
            balance=adm.org_remaining, refresh_at=iso_ms(adm.refresh_at_ms), level=adm.level,
            remaining=adm.remaining,
        )  # fmt: skip
        if adm.level == "org":
            out.detail = (
                f"{adm.feature} costs {adm.cost} tokens and {adm.remaining} are left in "
                f"bucket {adm.bucket}"
            )
        else:
            out.detail = (
                f"{adm.feature} costs {adm.cost} tokens and {adm.level} {adm.level_id} has "
                f"{adm.remaining} left of its cap of {adm.level_cap} in bucket {adm.bucket}"
            )
            out.facts.update(level_id=adm.level_id, cap=adm.level_cap, used=adm.level_used)
    elif adm.status == "not_in_plan":
        out.detail = f"{adm.feature} is not included in plan {adm.plan}"
        out.facts["plan"] = adm.plan
    elif adm.status == "rate_limited":
        retry = max(1, seconds(adm.retry_after_ms))
        out.detail = f"Rate limit of {adm.limit} reached; retry in {retry} s"
        out.headers = [
            ("Retry-After", str(retry)),
            ("RateLimit-Limit", str(adm.limit)),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", str(seconds(adm.limit_reset_ms))),
        ]
        out.facts["retry_after"] = retry
    elif adm.status == "in_flight":
        out.detail = "A request with this Idempotency-Key is still in progress"
        out.headers = [("Retry-After", str(IN_FLIGHT_RETRY_AFTER))]
        out.facts["retry_after"] = IN_FLIGHT_RETRY_AFTER
    elif adm.status == "reused":
        out.detail = (
            "This Idempotency-Key was used for a request with another method, path or body;"
            " use a new key for a new request"
        )
    else:
        reason = adm.replay_refusal
        if reason is not None:
            out.detail = (
                "A request with this Idempotency-Key already completed "
                f"(status {adm.replay_status}) and cannot be replayed: "
                f"{_UNREPLAYABLE[reason]}; it is not charged or forwarded again"
            )
            out.facts["replayable"] = False
        else:
            out.detail = (
                "A request with this Idempotency-Key already completed "
                f"(status {adm.replay_status}); it is not charged or forwarded again"
            )
        out.facts["original_status"] = adm.replay_status
    return out

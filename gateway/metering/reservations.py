"""Reservations (contract A9): reserve an estimate, then settle the actual or release it.

For apps that call creditgate instead of routing through it and learn a call's cost only
after it (an LLM call whose usage they read themselves): ``reserve`` holds the estimate
(one charge.lua call: the same checks and refusals as a metered request, 402 when even the
estimate does not fit), ``settle`` charges the actual (settle.lua: less than the estimate
refunds the rest, more takes the difference from what is left and records what cannot be
covered as overage, as for a usage-based request), ``release`` gives all of it back.

A reservation is a hold with its own expiry: one left unsettled is charged its reserve
when it expires, by the sync job's sweep (lua/sweep_holds.lua, one ``expired_hold``
event), or by a settle or release that comes after its expiry (the same event, the same
charge). Whatever finished it, its result is kept in Redis (``P:{sN}:rsv:<org>:<id>``) for
the idempotency window, and a repeated settle or release answers that result: a
reservation is never charged twice. Only the org that made a reservation can settle or
release it; for any other it does not exist.

An ``idempotency_key`` on ``reserve`` makes the reservation itself idempotent: a repeat
(same feature, estimate, user and ttl) returns the same reservation, another request
with the key is refused (``reused``, 422).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.config import Config
from gateway.metering.admission import Admission
from gateway.metering.meter import Meter
from gateway.metering.settlement import Actual, usage_value

__all__ = [
    "MAX_TTL_SECONDS",
    "Reservation",
    "ReservationNotFound",
    "ReservationRefused",
    "Reservations",
    "SettleResult",
    "is_reservation_id",
]

MAX_TTL_SECONDS = 86_400
"""The longest a reservation may stay open (24 h)."""

_ID = re.compile(r"[0-9a-f]{32}")

Outcome = Literal["settled", "released", "expired"]
# A release's usage value (lua/settle.lua): no actual, cost source reservation, the usage
# fields empty.
_RELEASED = " reservation" + " " * 6


def is_reservation_id(value: str) -> bool:
    """Whether ``value`` has the form of a reservation id (32 lower-case hex digits)."""
    return _ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens held for a call whose cost the app learns later."""

    id: str
    org: str
    feature: str
    bucket: str
    reserved: int
    expires_at_ms: int
    remaining: int
    """The bucket's tokens left once the reserve was taken."""
    user: str | None = None
    replayed: bool = False
    """A repeat of the reserve's Idempotency-Key: the reservation it made then."""

    @property
    def expires_at(self) -> datetime:
        """When an unsettled reservation is charged its reserve."""
        return datetime.fromtimestamp(self.expires_at_ms / 1000, tz=UTC)


@dataclass(frozen=True, slots=True)
class SettleResult:
    """How a reservation ended: ``charged + overage`` is the actual (0 when released);
    ``charged`` is the net tokens taken from the balance, ``refunded`` the part of the
    reserve given back, ``overage`` what the balance could not cover (recorded, never
    taken); ``remaining`` the bucket's tokens left after it (None when it expired
    unattended). ``outcome``: settled, released, or expired (charged its reserve)."""

    id: str
    reserved: int
    charged: int
    refunded: int
    overage: int
    remaining: int | None
    outcome: Outcome

    @classmethod
    def from_json(cls, text: str) -> SettleResult:
        """The result as settle.lua / sweep_holds.lua keep it."""
        data = json.loads(text)
        remaining = int(data["remaining"])
        outcome = data["outcome"]
        if outcome not in ("settled", "released", "expired"):
            raise ValueError(f"unknown reservation outcome {outcome!r}")
        return cls(
            str(data["id"]), int(data["reserved"]), int(data["charged"]),
            int(data["refunded"]), int(data["overage"]), None if remaining < 0 else remaining,
            outcome,
        )  # fmt: skip


class ReservationRefused(Exception):
    """The reserve was refused (not in plan, rate limited, not enough tokens, or its
    Idempotency-Key is in flight or was used for another request): ``admission`` says
    why, as for a metered request (gateway.metering.refusals)."""

    def __init__(self, admission: Admission) -> None:
        super().__init__(f"reservation refused: {admission.status}")
        self.admission = admission


class ReservationNotFound(LookupError):
    """No reservation with that id for that org (never made, another org's, or finished
    longer ago than the idempotency window)."""

    def __init__(self, reservation_id: str) -> None:
        super().__init__(f"no reservation {reservation_id!r}")
        self.reservation_id = reservation_id


def _reserve_fingerprint(
    feature: str, estimate: int | None, user: str | None, ttl_seconds: int | None
) -> str:
    text = "\0".join(
        ("reserve", feature, "" if estimate is None else str(estimate), user or "",
         "" if ttl_seconds is None else str(ttl_seconds))
    )  # fmt: skip
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


class Reservations:
    """Reserve, settle and release against one deployment's meter."""

    def __init__(self, config: Config, meter: Meter) -> None:
        self.config = config
        self.meter = meter
        self._result_ttl_ms = config.idempotency_ttl_seconds * 1000

    def estimate_of(self, feature: str, estimate: int | None) -> int:
        """The tokens to hold: ``estimate`` or the feature's reserve (its hold), at most
        the feature's max."""
        spec = self.config.cost_spec(feature)
        return min(spec.hold if estimate is None else estimate, spec.maximum)

    async def reserve(
        self,
        org: str,
        feature: str,
        *,
        estimate: int | None = None,
        user: str | None = None,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        """Hold the estimate (see the module docstring); ReservationRefused when the
        tokens cannot be held."""
        if feature not in self.config.features:
            raise KeyError(f"unknown feature {feature!r}")
        if estimate is not None and estimate < 1:
            raise ValueError("estimate must be at least 1")
        ttl = self.config.hold_ttl_seconds if ttl_seconds is None else ttl_seconds
        if not 1 <= ttl <= MAX_TTL_SECONDS:
            raise ValueError(f"ttl_seconds must be from 1 to {MAX_TTL_SECONDS}")
        cost = self.estimate_of(feature, estimate)
        adm, expires_ms = await self.meter.admission.reserve(
            org, feature, user=user, cost=cost, cap=self.config.cost_spec(feature).maximum,
            ttl_ms=ttl * 1000, result_ttl_ms=self._result_ttl_ms,
            idempotency_key=idempotency_key,
            fingerprint=_reserve_fingerprint(feature, estimate, user, ttl_seconds)
            if idempotency_key else None,
        )  # fmt: skip
        if adm.ok:
            assert adm.remaining is not None  # an admitted hold always reports what is left
            return Reservation(
                adm.request_id, org, feature, adm.bucket, cost, expires_ms, adm.remaining, user
            )
        stored = adm.stored
        if adm.status == "replay" and stored is not None and stored.startswith("V"):
            rid, reserved, expires, remaining = stored[1:].split(" ")
            return Reservation(
                rid, org, feature, adm.bucket, int(reserved), int(expires), int(remaining),
                user, replayed=True,
            )  # fmt: skip
        raise ReservationRefused(adm)

    async def settle(self, org: str, reservation_id: str, actual: int | Actual) -> SettleResult:
        """Charge the reservation's actual cost (capped by the feature's max); a repeat
        returns the first result. ReservationNotFound when ``org`` has no such
        reservation."""
        if not isinstance(actual, Actual):
            actual = Actual(int(actual), source="reservation")
        elif actual.source != "reservation":
            actual = Actual(actual.tokens, actual.usage, actual.missing, "reservation")
        if actual.tokens < 0:
            raise ValueError("actual must be 0 or more")
        return await self._finish(org, reservation_id, True, actual)

    async def release(self, org: str, reservation_id: str) -> SettleResult:
        """Give the whole reserve back (a repeat returns the first result)."""
        return await self._finish(org, reservation_id, False, None)

    async def _finish(
        self, org: str, reservation_id: str, ok: bool, actual: Actual | None
    ) -> SettleResult:
        if not is_reservation_id(reservation_id):
            raise ReservationNotFound(reservation_id)
        # A release has no actual: its event still says cost source reservation.
        usage = _RELEASED if actual is None else usage_value(actual, "reservation")
        ext = (usage, "", org)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.meter.settlement.queue_reservation(org, reservation_id, ok, ext, done)
        reply = await done
        if isinstance(reply, bytes):
            reply = reply.decode()
        if not isinstance(reply, str):
            raise ReservationNotFound(reservation_id)  # -1: unknown; -2: not this org's
        return SettleResult.from_json(reply)

"""Request and response bodies of the reservation endpoints of the token API (contract A9:
``POST /reservations``, ``.../{reservation_id}/settle``, ``.../{reservation_id}/release``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from gateway.http.models.fields import BodyInt
from gateway.http.models.token import Answer, Count, DateTime, Feature, Id, Key, Request

__all__ = [
    "ReservationHeaders",
    "ReservationPath",
    "ReservationRequest",
    "ReservationResult",
    "SettleRequest",
    "SettleResult",
]

MAX_ESTIMATE = 10**9
MAX_RESERVATION_TTL = 86_400  # gateway.metering.reservations.MAX_TTL_SECONDS


class ReservationRequest(Request):
    """``POST /reservations`` (contract A9)."""

    feature: Feature
    estimate: Annotated[int, BodyInt(1, MAX_ESTIMATE)] | None = Field(
        None,
        description="Tokens to hold (default: the feature's reserve); capped by its max",
    )
    user_id: Id | None = None
    ttl_seconds: Annotated[int, BodyInt(1, MAX_RESERVATION_TTL)] | None = Field(
        None,
        description="How long it may stay unsettled before it is charged its reserve"
        " (default: hold_ttl_seconds)",
    )


class ReservationHeaders(BaseModel):
    """The headers ``POST /reservations`` reads."""

    idempotency_key: Key | None = Field(
        None,
        alias="Idempotency-Key",
        description="A repeat with the same body returns the same reservation (201,"
        " Idempotent-Replayed: true); another body with the key is 422",
    )


class ReservationResult(Answer):
    """A reservation: tokens held until it is settled, released or expires."""

    id: str
    feature: str
    reserved: Count
    expires_at: DateTime
    remaining: Count


class ReservationPath(BaseModel):
    """The ``{reservation_id}`` of a path (an unknown or unreadable id is 404)."""

    reservation_id: str


class SettleRequest(Request):
    """``POST /reservations/{reservation_id}/settle``."""

    actual: Annotated[int, BodyInt(0, MAX_ESTIMATE)] = Field(
        description="What the call really cost, in tokens (capped by the feature's max)"
    )


class SettleResult(Answer):
    """How a reservation ended. ``charged`` is the net tokens taken (the actual minus the
    overage); ``overage`` the part of the actual the balance could not cover (recorded,
    never taken); ``outcome``: settled, released, or expired (charged its reserve)."""

    id: str
    reserved: Count
    charged: Count
    refunded: Count
    overage: Count
    remaining: Count | None
    outcome: Literal["settled", "released", "expired"]

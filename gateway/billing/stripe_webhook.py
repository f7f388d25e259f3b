"""``POST /webhooks/stripe``: Stripe subscriptions set plans, completed checkouts grant tokens.

Verification: the ``Stripe-Signature`` header is checked with the stripe library against
``billing.stripe.webhook_secret``; a signature older than ``tolerance_seconds`` is refused
(400), so a captured request cannot be replayed later. Nothing here calls Stripe's API.

Mapping (contract A4):
- ``customer.subscription.created`` / ``.updated``: the org is ``metadata.org_id``; the
  first item whose price id (``items.data[].price.id``, or the legacy ``.plan.id``) is in
  ``billing.stripe.plans`` names the plan. Status ``active``, ``trialing`` or ``past_due``
  puts the org on it; ``canceled``, ``unpaid``, ``incomplete_expired`` or ``paused`` put it
  back on ``default_plan``; ``incomplete`` (first payment pending) changes nothing.
  With ``period.anchor: subscription`` (contract A12) an applied plan (not a downgrade)
  also sets the org's period anchor: the day of ``billing_cycle_anchor`` (else
  ``current_period_start``) in ``period.timezone``; a renewal names the same day and
  changes nothing.
- ``customer.subscription.deleted``: back to ``default_plan``.
- ``checkout.session.completed`` with ``payment_status`` ``paid`` (or
  ``no_payment_required``), and ``checkout.session.async_payment_succeeded``: for each
  top-up price, a grant of ``amount x quantity`` tokens to the org ``client_reference_id``
  (or ``metadata.org_id``). Event payloads carry no line items unless the sender expanded
  them, so the price is read from ``line_items.data[].price.id`` when present, else from
  the session's ``metadata.price_id`` (and ``metadata.quantity``, default 1): set that
  metadata when creating the Checkout Session. The grant's reference is
  ``stripe:<session id>:<price id>`` (the session, not the event: the two event types of
  one session grant once) and it expires ``expires_in_days`` after the event's
  ``created``, so a redelivery computes the same grant.

Idempotency and order: grants are idempotent by reference and a plan change sets a value,
so applying an event twice changes nothing; on top of that every handled event is
recorded (table ``stripe_events``, or without a database a Redis key kept 7 days) and a
redelivery of an applied event is answered ``duplicate`` without touching anything.
Stripe does not deliver in order, so a subscription event older than the last one applied
to the org is ``stale`` and ignored, and a downgrade (deleted, or an ended status) applies
only when it comes from the subscription that set the org's plan last.

Answers: 200 for everything handled, ignored included (Stripe retries any other status for
days, and an event naming an unknown price or no org will not get better by retrying; it
is logged, recorded as ignored, and applies if resent after fixing the config); 400 for a
bad or old signature or an unreadable body; 503 when Redis or Postgres is down (Stripe
retries later); 404 when billing.stripe is not configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.config import StripeConfig
from gateway.core.anchors import local_date
from gateway.core.ids import valid_id
from gateway.core.problem import problem_response
from gateway.core.redis_keys import KeySpace

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    from gateway.metering.gate import CreditGate

    # A connection taken from the store's pool (generic only in the stubs).
    _Conn = PoolConnectionProxy[asyncpg.Record]

__all__ = ["SignatureError", "StripeWebhook", "WebhookResult"]

log = logging.getLogger("creditgate.webhooks")

MAX_BODY_BYTES = 1 << 20
REDIS_RECORD_TTL_S = 7 * 24 * 3600
_SUB_EVENTS = ("customer.subscription.created", "customer.subscription.updated")
_SUB_DELETED = "customer.subscription.deleted"
_CHECKOUT_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
_PLAN_STATUSES = frozenset({"active", "trialing", "past_due"})
_ENDED_STATUSES = frozenset({"canceled", "unpaid", "incomplete_expired", "paused"})
_PAID = frozenset({"paid", "no_payment_required"})
_FINAL = frozenset({"applied", "stale"})  # outcomes a redelivery must not redo


class SignatureError(Exception):
    """The Stripe-Signature header is missing, wrong, or too old."""


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """What one delivery did: applied, ignored, duplicate or stale."""

    event_id: str
    event_type: str
    outcome: str
    detail: str


@dataclass(frozen=True, slots=True)
class _Event:
    id: str
    type: str
    created: int  # Unix seconds
    obj: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Plan:
    """Put the org on ``plan``; ``downgrade`` when that is the default plan for an end."""

    plan: str
    downgrade: bool


@dataclass(frozen=True, slots=True)
class _Grant:
    bucket: str
    amount: int
    reference: str
    expires_at: datetime | None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# -- the record of handled events -------------------------------------------------------


class _Session(Protocol):
    async def outcome(self, event_id: str) -> str | None: ...
    async def latest_subscription(self, org: str) -> tuple[int, str] | None: ...
    async def record(
        self, ev: _Event, org: str | None, object_id: str, outcome: str, detail: str
    ) -> None: ...


class _PgSession:
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    async def outcome(self, event_id: str) -> str | None:
        result: str | None = await self.conn.fetchval(
            "SELECT outcome FROM stripe_events WHERE event_id = $1", event_id
        )
        return result

    async def latest_subscription(self, org: str) -> tuple[int, str] | None:
        row = await self.conn.fetchrow(
            "SELECT extract(epoch FROM event_created)::bigint AS created, object_id"
            " FROM stripe_events WHERE organization_id = $1 AND outcome = 'applied'"
            " AND event_type LIKE 'customer.subscription.%'"
            " ORDER BY event_created DESC, processed_at DESC LIMIT 1",
            org,
        )
        return None if row is None else (int(row["created"]), row["object_id"] or "")

    async def record(
        self, ev: _Event, org: str | None, object_id: str, outcome: str, detail: str
    ) -> None:
        await self.conn.execute(
            "INSERT INTO stripe_events (event_id, event_type, organization_id, object_id,"
            " event_created, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (event_id) DO UPDATE SET organization_id = EXCLUDED.organization_id,"
            " object_id = EXCLUDED.object_id, outcome = EXCLUDED.outcome,"
            " detail = EXCLUDED.detail, processed_at = now()",
            ev.id, ev.type, org, object_id or None,
            datetime.fromtimestamp(ev.created, UTC), outcome, detail[:1000],
        )  # fmt: skip


class _RedisSession:
    """Without a database: applied events are remembered 7 days (Stripe retries for 3)."""

    def __init__(self, client: Any, keys: KeySpace) -> None:
        self.client = client
        self.keys = keys

    async def outcome(self, event_id: str) -> str | None:
        value = await self.client.get(self.keys.stripe_event(event_id))
        return value.decode() if isinstance(value, bytes) else value

    async def latest_subscription(self, org: str) -> tuple[int, str] | None:
        raw = await self.client.get(self.keys.stripe_subscription(org))
        if not raw:
            return None
        created, _, sub = (raw.decode() if isinstance(raw, bytes) else raw).partition(":")
        return int(created), sub

    async def record(
        self, ev: _Event, org: str | None, object_id: str, outcome: str, detail: str
    ) -> None:
        if outcome not in _FINAL:
            return  # an ignored event is re-evaluated when delivered again
        await self.client.set(self.keys.stripe_event(ev.id), outcome, ex=REDIS_RECORD_TTL_S)
        if outcome == "applied" and org and ev.type.startswith("customer.subscription."):
            await self.client.set(self.keys.stripe_subscription(org), f"{ev.created}:{object_id}")


# -- the webhook ------------------------------------------------------------------------


class StripeWebhook:
    """Verifies and applies Stripe events for one gate; ``endpoint`` is the route handler."""

    def __init__(self, gate: CreditGate) -> None:
        self.gate = gate
        # One event at a time per process: Stripe's volume is low, and a handler holds a
        # pool connection (the per-org lock) while the gate takes others.
        self._lock = asyncio.Lock()

    @property
    def stripe_config(self) -> StripeConfig | None:
        """The billing.stripe section, or None when Stripe is not configured."""
        return self.gate.config.billing.stripe

    def verify(self, payload: bytes, header: str | None) -> dict[str, Any]:
        """Check the signature and its age; return the event as a dict."""
        import stripe  # ~0.15 s to import: only when a webhook arrives

        cfg = self.stripe_config
        if cfg is None:
            raise SignatureError("Stripe webhooks are not configured")
        try:
            text = payload.decode("utf-8")
            stripe.WebhookSignature.verify_header(
                text, header, cfg.webhook_secret, tolerance=cfg.tolerance_seconds
            )
        except (stripe.SignatureVerificationError, UnicodeDecodeError) as exc:
            raise SignatureError(str(exc).split(". ")[0]) from None
        event = json.loads(text)
        if not isinstance(event, dict):
            raise ValueError("the event is not a JSON object")
        return event

    async def endpoint(self, request: Request) -> Response:
        """Starlette handler of ``POST /webhooks/stripe``."""
        from gateway.core.errors import LedgerUnavailable, NoDatabase, RedisUnavailable

        if self.stripe_config is None:
            return problem_response(
                404, "not_configured", "Not configured", "billing.stripe is not set"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return problem_response(
                    413, "bad_request", "Body too large", "webhook body over 1 MiB"
                )
        try:
            event = self.verify(bytes(body), request.headers.get("stripe-signature"))
        except SignatureError as exc:
            log.warning("stripe webhook refused: %s", exc)
            return problem_response(400, "invalid_signature", "Invalid signature", str(exc))
        except ValueError as exc:
            return problem_response(400, "bad_request", "Unreadable event", str(exc))
        try:
            result = await self.handle(event)
        except (RedisUnavailable, LedgerUnavailable, NoDatabase, OSError, TimeoutError,
                asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.UndefinedTableError) as exc:  # fmt: skip
            log.error("stripe event %s not applied, Stripe will retry: %s", event.get("id"), exc)
            return problem_response(
                503, "unavailable", "Service unavailable",
                f"the event could not be applied now: {exc}", retry_after=30,
            )  # fmt: skip
        return JSONResponse(
            {"received": True, "event": result.event_id, "type": result.event_type,
             "outcome": result.outcome, "detail": result.detail}
        )  # fmt: skip

    async def handle(self, event: dict[str, Any]) -> WebhookResult:
        """Apply a verified event (see the module docstring); idempotent."""
        ev = _Event(
            id=str(event.get("id") or ""),
            type=str(event.get("type") or ""),
            created=int(event.get("created") or 0),
            obj=_dict(_dict(event.get("data")).get("object")),
        )
        if not ev.id:
            return WebhookResult("", ev.type, "ignored", "event without an id")
        if ev.type in (*_SUB_EVENTS, _SUB_DELETED):
            org = _dict(ev.obj.get("metadata")).get("org_id")
        elif ev.type in _CHECKOUT_EVENTS:
            org = ev.obj.get("client_reference_id") or _dict(ev.obj.get("metadata")).get("org_id")
        else:
            log.debug("stripe event %s of type %s ignored", ev.id, ev.type)
            return WebhookResult(ev.id, ev.type, "ignored", f"event type {ev.type} is not handled")
        object_id = str(ev.obj.get("id") or "")
        async with self._lock:
            if not valid_id(org):
                detail = "no usable org: set metadata.org_id" + (
                    "" if ev.type.startswith("customer.") else " or client_reference_id"
                )
                log.warning("stripe event %s (%s) ignored: %s", ev.id, ev.type, detail)
                async with self._session(None) as session:
                    if await session.outcome(ev.id) in _FINAL:
                        return WebhookResult(ev.id, ev.type, "duplicate", "already handled")
                    await session.record(ev, None, object_id, "ignored", detail)
                return WebhookResult(ev.id, ev.type, "ignored", detail)
            assert isinstance(org, str)
            async with self._session(org) as session:
                previous = await session.outcome(ev.id)
                if previous in _FINAL:
                    return WebhookResult(ev.id, ev.type, "duplicate", f"already {previous}")
                if ev.type in _CHECKOUT_EVENTS:
                    outcome, detail = await self._checkout(ev, org)
                else:
                    outcome, detail = await self._subscription(ev, org, object_id, session)
                await session.record(ev, org, object_id, outcome, detail)
        level = logging.INFO if outcome == "applied" else logging.WARNING
        log.log(level, "stripe event %s (%s), org %s: %s: %s", ev.id, ev.type, org, outcome, detail)
        return WebhookResult(ev.id, ev.type, outcome, detail)

    @contextlib.asynccontextmanager
    async def _session(self, org: str | None) -> AsyncIterator[_Session]:
        store = await self.gate.store()
        if store is None:
            yield _RedisSession(self.gate.redis.client, self.gate.keys)
            return
        async with store.pool.acquire() as conn, conn.transaction():
            if org is not None:
                # Serialises one org's events across every gateway process.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                    "creditgate:stripe:" + org,
                )
            yield _PgSession(conn)

    # -- subscriptions ------------------------------------------------------------------

    def _subscription_plan(self, ev: _Event) -> tuple[_Plan | None, str]:
        cfg = self.stripe_config
        assert cfg is not None
        prices = []
        for item in _list(_dict(ev.obj.get("items")).get("data")):
            item = _dict(item)
            price = _dict(item.get("price")).get("id") or _dict(item.get("plan")).get("id")
            if price:
                prices.append(str(price))
        mapped = [p for p in prices if p in cfg.plans]
        if not mapped:
            return None, f"no subscription item has a configured price (prices: {prices})"
        plan = cfg.plans[mapped[0]]
        status = str(ev.obj.get("status") or "")
        default = self.gate.config.default_plan
        if ev.type == _SUB_DELETED or status in _ENDED_STATUSES:
            why = "deleted" if ev.type == _SUB_DELETED else f"status {status}"
            return _Plan(default, True), f"subscription {why}: plan {default}"
        if status in _PLAN_STATUSES:
            return _Plan(plan, False), f"price {mapped[0]} (status {status}): plan {plan}"
        return None, f"subscription status {status!r} changes no plan"

    async def _subscription(
        self, ev: _Event, org: str, sub_id: str, session: _Session
    ) -> tuple[str, str]:
        action, detail = self._subscription_plan(ev)
        if action is None:
            return "ignored", detail
        latest = await session.latest_subscription(org)
        if latest is not None and ev.created < latest[0]:
            return "stale", f"older than subscription event of {latest[0]} already applied"
        if action.downgrade and latest is not None and latest[1] != sub_id:
            return "ignored", f"{detail} skipped: the org's plan comes from {latest[1]}"
        old = await self.gate.set_plan(org, action.plan)
        detail = f"{detail} (was {old or 'new org'})"
        if not action.downgrade and self.gate.config.calendar.anchor == "subscription":
            # contract A12: the org's periods follow its subscription's billing cycle. Its
            # own anchor day again (every renewal) changes nothing in set_period_anchor.
            day = self._anchor_day(ev)
            if day is not None:
                anchor = await self.gate.set_period_anchor(org, day)
                detail += f"; period anchor {anchor}"
        return "applied", detail

    def _anchor_day(self, ev: _Event) -> int | None:
        """The subscription's anchor day in the config's period time zone (contract A12).

        ``billing_cycle_anchor`` first: it keeps the day the cycle was set on, where
        ``current_period_start`` of a renewal is already clamped (a subscription anchored on
        the 31st renews on Feb 28, which must not become the org's anchor). Newer Stripe API
        versions carry ``current_period_start`` on the items only, so those are read last.
        None when the event has none of them."""
        obj = ev.obj
        candidates = [obj.get("billing_cycle_anchor"), obj.get("current_period_start")]
        for item in _list(_dict(obj.get("items")).get("data")):
            candidates.append(_dict(item).get("current_period_start"))
        for value in candidates:
            # bool is an int: a malformed payload's true must not become day 1 of 1970.
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return local_date(value * 1000, self.gate.config.calendar.zone).day
        return None

    # -- checkouts ----------------------------------------------------------------------

    def _checkout_grants(self, ev: _Event) -> tuple[list[_Grant], str]:
        cfg = self.stripe_config
        assert cfg is not None
        obj = ev.obj
        if obj.get("mode") == "subscription":
            return [], "subscription checkout: the subscription events set the plan"
        payment = str(obj.get("payment_status") or "")
        if ev.type == "checkout.session.completed" and payment not in _PAID:
            return [], f"payment_status {payment!r}: waiting for async_payment_succeeded"
        items: list[tuple[str, int]] = []
        for line in _list(_dict(obj.get("line_items")).get("data")):
            line = _dict(line)
            price = _dict(line.get("price")).get("id")
            if price:
                items.append((str(price), _quantity(line.get("quantity"))))
        if not items:
            meta = _dict(obj.get("metadata"))
            if meta.get("price_id"):
                items.append((str(meta["price_id"]), _quantity(meta.get("quantity"))))
        session_id = str(obj.get("id") or ev.id)
        grants, unknown = [], []
        for price, qty in items:
            topup = cfg.topups.get(price)
            if topup is None or qty < 1:
                unknown.append(price)
                continue
            expires = None
            if topup.expires_in_days is not None:
                expires = datetime.fromtimestamp(ev.created, UTC) + timedelta(
                    days=topup.expires_in_days
                )
            grants.append(
                _Grant(topup.bucket, topup.amount * qty, f"stripe:{session_id}:{price}", expires)
            )
        if not items:
            return [], "no price id: set metadata.price_id on the Checkout Session"
        if unknown:
            log.warning("stripe event %s: prices %s are not configured top-ups", ev.id, unknown)
        if not grants:
            return [], f"no configured top-up price (prices: {[p for p, _ in items]})"
        return grants, ""

    async def _checkout(self, ev: _Event, org: str) -> tuple[str, str]:
        grants, detail = self._checkout_grants(ev)
        if not grants:
            return "ignored", detail
        from gateway.ledger.store import GrantConflict

        done = []
        for g in grants:
            try:
                _, created = await self.gate.grant(
                    org, g.bucket, g.amount, reference=g.reference, expires_at=g.expires_at
                )
            except GrantConflict as exc:  # the top-up's amount changed in the config since
                log.error("stripe event %s: %s", ev.id, exc)
                done.append(f"{g.reference} refused: {exc}")
                continue
            done.append(f"{g.amount} {g.bucket}" + ("" if created else " (already granted)"))
        return "applied", "granted " + ", ".join(done)


def _quantity(value: Any) -> int:
    try:
        qty = int(value) if value is not None else 1
    except (TypeError, ValueError):
        return 0
    return qty if 0 < qty <= 1_000_000 else 0

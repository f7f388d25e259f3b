"""``CreditGateMiddleware``: meters an ASGI app's AI routes (DESIGN A1 middleware, A3).

A pure ASGI middleware in the manner of ``starlette/middleware/``: the instance holds the
config, all per-request state lives in locals, ``send`` is wrapped to add headers and to
see the status, and bodies are never buffered. The reverse proxy is this middleware in
front of ``UpstreamProxy``.

Every request, metered or not, loses what the header policy (gateway/core/headers.py)
says a client may not send. Per metered request: normalise the path and match a route (in
process), identify the caller (in process on a cache hit), one EVALSHA to admit, call the
app, then queue the settle (charge, or refund when the status is in the feature's
``refund_on`` or the upstream failed) without waiting for it. The data path is described
step by step in docs/ARCHITECTURE.md.

A feature whose cost is decided after the response (DESIGN A8: ``usage`` or ``header``)
takes a branch of its own, :meth:`CreditGateMiddleware._variable_call`, with the request
read before the call and the response watched as it passes (gateway/metering/usage_tap.py);
fixed costs never enter it.

A metered request with an ``Idempotency-Key`` (contract A9) takes
:meth:`CreditGateMiddleware._idempotent_call` (built of gateway/metering/replay.py): its
body read for its fingerprint, a repeat answered without the app, the response kept for
a replay. A request without one never enters it and is never read ahead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import Config
from gateway.config.refunds import refund_statuses
from gateway.core.errors import IdentityUnavailable, LedgerUnavailable, RedisUnavailable
from gateway.core.headers import HeaderPolicy, applied
from gateway.core.logs import REQUEST_ID, access_log_enabled, log_access
from gateway.core.problem import send_problem
from gateway.core.scope_keys import (
    ASKS_IDENTITY_ENCODING,
    DRAINS_USAGE,
    READS_USAGE_REQUEST,
    UPSTREAM_ERROR,
    UPSTREAM_LATENCY_MS,
    UPSTREAM_STATUS,
    USAGE_DRAIN_SECONDS,
    USAGE_TAP,
)
from gateway.core.splice import SEND_PASSES_BODY
from gateway.identity.identifier import Identity, IdentityFailure
from gateway.metering.cost_headers import refunded_headers
from gateway.metering.gate import CreditGate
from gateway.metering.meter import Admission, new_request_id
from gateway.metering.refusals import describe_refusal
from gateway.metering.replay import (
    ResponseCapture,
    fingerprint_of,
    read_for_fingerprint,
    send_replay,
)
from gateway.metering.usage_tap import (
    REQUEST_BODY_LIMIT,
    ReplayFirst,
    RequestRead,
    ResponseTap,
    TapReceive,
    VariableCost,
    identity_encoding,
    read_request,
    replaced_body_headers,
)
from gateway.routing.paths import AmbiguousPath, BadPath, normalize_path, strip_path_params
from gateway.routing.router import RouteMatch
from gateway.usage import ensure_stream_usage

log = logging.getLogger("creditgate.middleware")

Header = tuple[bytes, bytes]
_UNAVAILABLE = (IdentityUnavailable, RedisUnavailable, LedgerUnavailable)
_new = object.__new__


class _ChargedSend:
    """The app's ``send`` for an admitted fixed-cost request: it sees the response's status
    (``status``, 0 until the start went out) and adds the charge's headers to the start,
    or the refunded ones when the status is in the feature's ``refund_on`` or the upstream
    failed; every message then goes to the server's ``send`` as it is, and its awaitable
    is handed back (no coroutine of its own per message).

    One ``__slots__`` object, made once the request is admitted, handed to the app as its
    bound method :meth:`forward` (a cheaper call than the object's): the closure it replaces
    cost seven GC-tracked objects (six cells and the function), the cells alive across the
    charge's wait (BENCHMARKS.md section 1, round 10)."""

    __slots__ = ("adm", "charged", "refund_on", "send", "state", "status")

    # No __init__: the middleware makes it with object.__new__ and sets its six slots in
    # its own frame (a class's __init__, called through the type, runs in a new
    # interpreter loop: ~800 instructions more per request; BENCHMARKS.md section 1,
    # round 12).
    send: Send
    refund_on: frozenset[int]
    state: MutableMapping[str, Any]
    charged: list[Header]
    adm: Admission
    status: int

    def forward(self, message: Message) -> Awaitable[None]:
        """The app's ``send``: the middleware hands the app this bound method, not the
        object. A Python caller's call of a bound method is a frame pushed in the running
        interpreter loop; calling an object through its ``__call__`` goes through C
        (``slot_tp_call``) into a new one (BENCHMARKS.md section 1, round 12)."""
        if message["type"] == "http.response.start":
            status = self.status = message["status"]
            # A status that refunds is known here: the headers say nothing was charged.
            if status in self.refund_on or UPSTREAM_ERROR in self.state:
                extra = refunded_headers(self.charged, self.adm)
            else:
                extra = self.charged
            message["headers"] = [*message.get("headers", ()), *extra]
        return self.send(message)

    __call__ = forward


class CreditGateMiddleware:
    """Meter the routes of ``config`` in front of ``app``.

    ``app.add_middleware(CreditGateMiddleware, config="creditgate.yaml")`` in Starlette or
    FastAPI, or ``CreditGateMiddleware(app, gate=CreditGate.from_config(...))``. The app's
    own auth may name the caller by setting ``scope["state"]["creditgate_org"]`` (and
    ``"creditgate_user"``, and ``"creditgate_team"`` for team caps, contract A10) in an
    outer middleware.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: str | os.PathLike[str] | Config | None = None,
        *,
        gate: CreditGate | None = None,
    ) -> None:
        if gate is None:
            if config is None:
                raise TypeError("CreditGateMiddleware needs config= or gate=")
            gate = CreditGate.from_config(config)
        config = gate.config
        self.app = app
        self.gate = gate
        self.router = gate.router
        self.meter = gate.meter
        # Meter.admit hands out this coroutine: calling it directly saves a Python call on
        # every fixed-cost request (the other paths keep the meter's public method).
        self._admit = gate.meter.admission.admit
        # The fixed-cost request's charge, its three steps bound once (Admitter.send_plain).
        admission = gate.meter.admission
        self._send_charge = admission.send_plain
        self._admitted = admission.admitted
        self._answer_charge = admission.answer
        # Likewise Meter.settle_nowait's queue, for the fixed-cost request's settle.
        self._queue_settle = gate.meter.settlement.queue
        # The gate's counters (the process's by default): /metrics reads the same ones.
        self.counters = gate.counters
        self.identifier = gate.identifier
        trusted = config.identity.trusted_headers
        self.headers = HeaderPolicy(
            trusted_headers=trusted, forward_credentials=config.forward_credentials
        )
        # creditgate's own token API, when the app mounts it behind this middleware,
        # authenticates with the caller's key: requests under api_prefix keep it.
        self._api_prefix = config.api_prefix.rstrip("/")
        self._api_headers = HeaderPolicy(trusted_headers=trusted, forward_credentials=True)
        self.fail_open = config.fail_open
        self.retry_unavailable = config.retry_after_unavailable_seconds
        self.access_log = access_log_enabled(config.access_log)
        self.fail_open_count = 0
        self._refund_on = {
            name: refund_statuses(feature.refund_on) for name, feature in config.features.items()
        }
        # Header values that only depend on the route, encoded once.
        self._feature_header = {
            name: (b"x-creditgate-feature", name.encode()) for name in config.features
        }
        self._cost_header: dict[int, Header] = {}
        self._limit_header: dict[int, Header] = {}  # a limiter's count: few
        # An app that keeps reading the upstream itself when asked (USAGE_DRAIN_SECONDS):
        # the proxy. Any other app is drained by seeing the client's disconnect late.
        self._app_drains = getattr(app, DRAINS_USAGE, False) is True
        # The drain a variable-cost request's receive holds a disconnect back for, when it
        # has one (ResponseTap, TapReceive): none for such an app.
        self._tap_drain = 0.0 if self._app_drains else config.usage_drain_seconds
        # An app that reads the request body anyway and asks for include_usage itself when
        # told (USAGE_TAP's request element): the proxy. Any other app gets the body read
        # before the call and replayed.
        self._app_reads_request = getattr(app, READS_USAGE_REQUEST, False) is True
        # An app that asks its upstream for an uncompressed answer itself (the proxy, in the
        # head it builds): the request's headers are then not copied to ask for it here.
        self._app_asks_identity = getattr(app, ASKS_IDENTITY_ENCODING, False) is True
        # The features whose cost is read from the response (DESIGN A8), and only those:
        # a fixed cost never takes the variable branch.
        self._variable = {
            name: VariableCost(
                config.cost_spec(name),
                config.prices,
                config.usage_drain_seconds,
                app_reads_request=self._app_reads_request,
                app_asks_identity=self._app_asks_identity,
            )
            for name in config.features
            if config.is_variable(name)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return

        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        try:
            match, path, encoded_path = self.router.resolve(scope["method"], raw_path)
        except BadPath as exc:
            if isinstance(exc, AmbiguousPath) or self._could_be_metered(scope["method"], raw_path):
                await send_problem(
                    send, 400, "bad_path", "Malformed path", f"The request path is refused: {exc}"
                )
                return
            await self.app(self._cleaned(scope, None), receive, send)  # unmetered
            return
        if match is None:  # unmetered: passes through uncharged, its headers cleaned
            await self.app(self._cleaned(scope, path), receive, send)
            return

        # The metered path stays in this one coroutine (helpers are plain functions): every
        # coroutine layer costs a frame on each await and each resume of the request's task.
        try:
            decided = self.identifier.decide(scope)  # identify_nowait, one call fewer
            # (`.__class__ is`, not isinstance: a load, not a call; mypy cannot narrow it.)
            if decided.__class__ is tuple:
                decided = await self.identifier.identify(scope)
            ident: Identity | IdentityFailure = decided  # type: ignore[assignment]
        except _UNAVAILABLE as exc:
            self.counters.count(match.feature, "refused_unavailable")
            await self._identity_unavailable(scope, send, match, exc)
            return
        if isinstance(ident, IdentityFailure):
            self.counters.count(
                match.feature,
                "refused_unauthenticated" if ident.status == 401 else "refused_bad_credentials",
            )
            await self._unauthenticated(scope, send, match, ident)
            return
        # The policy's verdict only: the fixed-cost request builds its cleaned header list
        # once admitted (a list alive across the charge's wait is one more object for the
        # collector's young passes); the other branches take it now.
        removal, idem_key, duplicate_key = self.headers.inspect(scope["headers"])
        if duplicate_key:
            self.counters.count(match.feature, "refused_bad_request")
            await self._duplicate_idempotency_key(scope, send, match, ident)
            return
        variable = self._variable.get(match.feature)
        headers = (
            None if idem_key is None and variable is None else applied(scope["headers"], removal)
        )
        if idem_key is not None:  # contract A9: a branch of its own (gateway/metering/replay.py)
            await self._idempotent_call(
                scope, receive, send, match, ident, headers, idem_key, path, encoded_path
            )
            return
        if variable is not None:
            await self._variable_call(
                scope, receive, send, match, ident, headers, idem_key, path, encoded_path, variable
            )
            return

        request_id = new_request_id()
        try:
            # The charge in three steps (Admitter.send_plain, admitted, answer), its reply
            # awaited here: no coroutine of the charge's own alive across the wait, and one
            # level fewer for the task to resume through (BENCHMARKS.md section 1, round 11).
            sent, template, encoded, total, refresh_at, started = self._send_charge(
                ident.org, match.feature, ident.user, match.cost, request_id,
                scope["method"], match.template, ident.key_id, ident.team,
            )  # fmt: skip
            reply = await sent
            adm = self._admitted(
                reply, ident.org, match.feature, request_id, total, refresh_at, started
            )
            if adm is None:  # a refusal, an org to seed, levels to learn, an error reply...
                adm = await self._answer_charge(
                    reply, ident.org, match.feature, request_id, total, refresh_at, started,
                    template, encoded, user=ident.user, cost=match.cost, method=scope["method"],
                    route=match.template, key_id=ident.key_id, team=ident.team,
                )  # fmt: skip
        except (RedisUnavailable, LedgerUnavailable) as exc:
            REQUEST_ID.set(request_id)
            rid = (b"x-creditgate-request-id", request_id.encode())
            headers = applied(scope["headers"], removal)
            inner = self._inner_scope(scope, headers, path, encoded_path, ident, match, rid)
            await self._unavailable(inner, receive, send, match, ident, str(exc))
            return
        # Every log line of this request from here on carries its id. Set once the charge
        # answered, not before: the context variable's new map (two GC-tracked objects)
        # would be alive across the charge's wait, where the collector's young passes count
        # them (BENCHMARKS.md section 1, round 11). A line the charge itself logs (the
        # org's seeding) gets the id from Admitter.admit, which sets it on that path.
        REQUEST_ID.set(request_id)
        if adm.status != "ok":
            self.counters.count(match.feature, "refused_" + adm.status)
            await self._refuse(scope, send, match, ident, adm)
            return

        # The app's scope is built once admitted, not before the charge: objects alive
        # across the charge's suspension are what the cycle collector's young passes walk
        # (and, once promoted, its full ones) while the request waits for Redis.
        rid = (b"x-creditgate-request-id", request_id.encode())
        # (removal -1: nothing to remove, the usual; applied's call spared.)
        headers = None if removal == -1 else applied(scope["headers"], removal)
        inner = self._inner_scope(scope, headers, path, encoded_path, ident, match, rid)
        charged = self._charged_headers(adm, rid)
        state = inner["state"]
        # The app's send: an object built once admitted, not a closure. A closure's cells
        # are made when __call__ starts (one per variable it shares, six), so they were
        # alive across the charge's wait, where the collector's young passes count them.
        refund_on = self._refund_on[match.feature]
        sender = _new(_ChargedSend)  # its slots set here (see the class)
        sender.send, sender.refund_on, sender.state = send, refund_on, state
        sender.charged, sender.adm, sender.status = charged, adm, 0
        forward = sender.forward  # one bound method: the declaration below names this object
        started = time.perf_counter()
        # It looks only at the start: the proxy may splice a stream's body around it.
        state[SEND_PASSES_BODY] = (forward, send)
        ok = False
        try:
            await self.app(inner, receive, forward)
            # Charged unless the status is in the feature's refund_on, or the upstream
            # failed (mid-body, after its status went out): no answer at all refunds too.
            status = sender.status
            ok = status > 0 and status not in refund_on and UPSTREAM_ERROR not in state
        finally:
            # Queue the charge or refund (never awaited) and count it; inlined, as this is
            # every fixed-cost request's end.
            status = sender.status
            latency = state.get(UPSTREAM_LATENCY_MS)
            if latency is None:
                latency = (time.perf_counter() - started) * 1000
            self._queue_settle(
                adm, ok, state.get(UPSTREAM_STATUS, status or None), round(latency), idem_key, None
            )
            self.counters.count(adm.feature, "charged" if ok else "refunded", adm.cost if ok else 0)
            # The sender holds the state, which holds the sender: without this pop each
            # request is a reference cycle, freed by the cycle collector (its passes cost
            # ~9k instructions per request) instead of at once.
            state.pop(SEND_PASSES_BODY, None)
            if self.access_log:
                self._log_access(scope, match, ident, adm, ok, status, started)

    async def _variable_call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        match: RouteMatch,
        ident: Identity,
        headers: list[Header] | None,
        idem_key: str | None,
        path: str,
        encoded_path: bytes,
        cost: VariableCost,
        pre_read: RequestRead | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """A metered request whose charge is decided after the response (DESIGN A8): hold
        the reserve (read from the request when it depends on it), call the app with the
        response watched, settle the actual cost.

        ``pre_read`` and ``fingerprint``: the body already read for an Idempotency-Key's
        fingerprint (:meth:`_idempotent_call`); the response is then kept for a replay.

        Every usage-charged request comes through here, so it is written as the fixed-cost
        path is: one coroutine, the per-feature decisions made once in :class:`VariableCost`,
        no closures, and the app's ``receive`` wrapped only when a message must be replayed
        or a disconnect held back (bench/usage_instructions.py counts what each costs)."""
        replay: list[Message] | None = None
        body: bytes | None = None
        hold = cost.quick_hold if pre_read is None else None
        if hold is not None:
            # The usual usage-charged request through the proxy: nothing to do before the
            # call (include_usage and Accept-Encoding left to the app, the hold known).
            request = cost.request
        else:
            # Left to the app (the proxy), which reads the body anyway: the body read only to
            # ask for include_usage, when nothing read it yet (USAGE_TAP's request element).
            request = cost.request if self._app_reads_request and pre_read is None else None
            if pre_read is not None:
                replay = pre_read.messages
                if cost.reads_body:
                    body = pre_read.body
            elif cost.reads_body and request is None:
                first = await receive()
                data: bytes = first.get("body", b"")
                if (
                    first["type"] == "http.request"
                    and not first.get("more_body", False)
                    and len(data) <= REQUEST_BODY_LIMIT
                ):  # the usual body: whole in one message
                    replay, body = [first], data
                else:
                    read = await read_request(receive, scope["headers"], first=first)
                    if read.disconnected:
                        return  # gone before anything was held: nothing to answer or charge
                    replay, body = read.messages, read.body
            if cost.usage:
                # A compressed answer could not be read: ask for none. An OpenAI stream that
                # would not report its usage: ask for it (README). A body without the key
                # cannot be a stream: spared the JSON decode. (A key spelt with escapes is not
                # recognised and gets no usage: the missing-usage policy.)
                # (identity_encoding and replaced_body_headers make new lists: the scope's is
                # not changed. An app that asks for identity itself, the proxy, gets the headers
                # as they are: no copy of the list on the usual usage-charged request.)
                # (find, not `in`: bytes' `in` first tries its argument as an int, and the
                # TypeError it makes and clears costs more than the search.)
                if body is not None and cost.asks_stream_usage and body.find(b'"stream"') >= 0:
                    changed = ensure_stream_usage(body)
                    if changed is not None:
                        body = changed
                        replay = [{"type": "http.request", "body": changed, "more_body": False}]
                        headers = replaced_body_headers(
                            scope["headers"] if headers is None else headers, len(changed)
                        )
                if not self._app_asks_identity:
                    headers = identity_encoding(scope["headers"] if headers is None else headers)
            hold = cost.reserve if cost.reserve is not None else cost.hold(body, path)

        request_id = new_request_id()
        REQUEST_ID.set(request_id)
        rid = (b"x-creditgate-request-id", request_id.encode())
        inner = self._inner_scope(scope, headers, path, encoded_path, ident, match, rid)
        state = inner["state"]
        try:
            if idem_key is None:
                # The charge in the fixed-cost path's three steps (Admitter.send_plain,
                # admitted, answer): no coroutine of the charge's own, no keyword call
                # (bench/usage_instructions.py; the same bytes go to Redis as admit sends).
                sent, template, encoded, total, refresh_at, began = self._send_charge(
                    ident.org, match.feature, ident.user, hold, request_id,
                    scope["method"], match.template, ident.key_id, ident.team,
                )  # fmt: skip
                reply = await sent
                adm = self._admitted(
                    reply, ident.org, match.feature, request_id, total, refresh_at, began
                )
                if adm is None:  # a refusal, an org to seed, levels to learn, an error...
                    adm = await self._answer_charge(
                        reply, ident.org, match.feature, request_id, total, refresh_at, began,
                        template, encoded, user=ident.user, cost=hold, method=scope["method"],
                        route=match.template, key_id=ident.key_id, team=ident.team,
                    )  # fmt: skip
            else:
                adm = await self._admit(
                    ident.org, match.feature, user=ident.user, cost=hold,
                    idempotency_key=idem_key, request_id=request_id, method=scope["method"],
                    route=match.template, fingerprint=fingerprint, key_id=ident.key_id,
                    team=ident.team,
                )  # fmt: skip
        except (RedisUnavailable, LedgerUnavailable) as exc:
            replayed = receive if replay is None else TapReceive(replay, receive, None, 0.0)
            await self._unavailable(inner, replayed, send, match, ident, str(exc))
            return
        if adm.status != "ok":
            await self._not_admitted(scope, send, match, ident, adm)
            return

        refund_on = self._refund_on[match.feature]
        # An Idempotency-Key's response is kept as the client gets it, for a replay.
        capture = None if fingerprint is None else ResponseCapture(send, self.meter.max_replay_body)
        tap = ResponseTap(
            cost, send if capture is None else capture.send, state, adm,
            self._charged_headers(adm, rid), refund_on, path,
        )  # fmt: skip
        tap_send = tap.send  # one bound method: the declarations below name this object
        if capture is None:
            # The tap changes no piece: the proxy may splice a stream's body around it,
            # handing each piece to the tap's observer (ResponseTap.splice_observer).
            state[SEND_PASSES_BODY] = (tap_send, send, tap.splice_observer)
        if cost.usage:
            # An answer complete before its start goes to the tap in one call; the app
            # may be left the request body (read ahead above otherwise).
            state[USAGE_TAP] = (tap_send, tap.answer, request)
        drain = cost.drain_s
        if drain > 0:
            state[USAGE_DRAIN_SECONDS] = drain
            drain = self._tap_drain  # 0 for the proxy: it keeps reading by itself
        # The app's receive: the body read before the call first, and (an app that does
        # not drain by itself) the client's disconnect held back while its answer goes on.
        if replay is not None and len(replay) == 1 and drain <= 0:  # the usual
            tapped: Receive = ReplayFirst(replay[0], receive)
        elif replay or drain > 0:
            tapped = TapReceive(replay or [], receive, tap, drain)
        else:
            tapped = receive
        started = time.perf_counter()
        ok = False
        try:
            await self.app(inner, tapped, tap_send)
            if tap.quiet is None and tap.held:  # (priced: complete, so nothing is held)
                await tap.close()
            status = tap.status
            ok = status > 0 and status not in refund_on and UPSTREAM_ERROR not in state
        finally:
            status = tap.status
            latency = state.get(UPSTREAM_LATENCY_MS)
            if latency is None:
                latency = (time.perf_counter() - started) * 1000
            quiet = tap.quiet
            if ok and quiet is not None and capture is None:
                # A complete answer, priced by the tap (ResponseTap.answer): its settle
                # value is ready, queued as settle_nowait would queue it (through the
                # settlement's queue as it is now: tests spy on it).
                tokens = tap.tokens
                self.meter.settlement.queue(
                    adm, True, state.get(UPSTREAM_STATUS, status), round(latency), idem_key,
                    None, quiet,
                )  # fmt: skip
                self.counters.charged_usage(adm.feature, tap.model, tokens, tap.missing)
            else:
                actual = tap.actual() if ok else None
                self.meter.settle_nowait(
                    adm, ok=ok, status=state.get(UPSTREAM_STATUS, status or None),
                    latency_ms=round(latency), idempotency_key=idem_key, actual=actual,
                    response=capture.stored() if ok and capture is not None else None,
                )  # fmt: skip
                tokens = 0
                if actual is not None:
                    tokens, usage = actual.tokens, actual.usage
                    model = "" if usage is None or usage.model is None else usage.model
                    self.counters.usage(adm.feature, model, tokens, actual.missing)
                self.counters.count(adm.feature, "charged" if ok else "refunded", tokens)
            # The declarations name the tap, which names the state: without them the
            # request's objects are freed at once, not by the cycle collector.
            state.pop(SEND_PASSES_BODY, None)
            state.pop(USAGE_TAP, None)
            if self.access_log:
                log_access(
                    request_id=adm.request_id, method=scope["method"], route=match.template,
                    org=ident.org, user=ident.user, feature=match.feature, status=status,
                    cost=tokens, refunded=not ok,
                    latency_ms=round((time.perf_counter() - started) * 1000, 1),
                    upstream_status=state.get(UPSTREAM_STATUS),
                )  # fmt: skip

    async def _idempotent_call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        match: RouteMatch,
        ident: Identity,
        headers: list[Header] | None,
        idem_key: str,
        path: str,
        encoded_path: bytes,
    ) -> None:
        """A metered request with an Idempotency-Key (contract A9; the steps are in
        gateway/metering/replay.py): the body read for the request's fingerprint and given
        to the app unchanged, admitted with it; a repeat replayed or refused without the
        app; the response of a charged request kept for its repeats."""
        pre_read, fingerprinted = await read_for_fingerprint(receive)
        if pre_read.disconnected:
            return  # gone before anything was held: nothing to answer or charge
        fingerprint = fingerprint_of(scope, path, pre_read, fingerprinted)
        variable = self._variable.get(match.feature)
        if variable is not None:
            await self._variable_call(
                scope, receive, send, match, ident, headers, idem_key, path, encoded_path,
                variable, pre_read, fingerprint,
            )  # fmt: skip
            return

        replayed = TapReceive(pre_read.messages, receive, None, 0.0)
        request_id = new_request_id()
        REQUEST_ID.set(request_id)
        rid = (b"x-creditgate-request-id", request_id.encode())
        inner = self._inner_scope(scope, headers, path, encoded_path, ident, match, rid)
        try:
            adm = await self.meter.admit(
                ident.org, match.feature, user=ident.user, cost=match.cost,
                idempotency_key=idem_key, request_id=request_id, method=scope["method"],
                route=match.template, fingerprint=fingerprint, key_id=ident.key_id,
                team=ident.team,
            )  # fmt: skip
        except (RedisUnavailable, LedgerUnavailable) as exc:
            await self._unavailable(inner, replayed, send, match, ident, str(exc))
            return
        if adm.status != "ok":
            await self._not_admitted(scope, send, match, ident, adm)
            return

        charged = self._charged_headers(adm, rid)
        refund_on = self._refund_on[match.feature]
        state = inner["state"]
        capture = ResponseCapture(send, self.meter.max_replay_body)
        status = 0
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status in refund_on or UPSTREAM_ERROR in state:
                    extra = refunded_headers(charged, adm)
                else:
                    extra = charged
                message["headers"] = [*message.get("headers", ()), *extra]
            await capture.send(message)

        ok = False
        try:
            await self.app(inner, replayed, send_wrapper)
            ok = status > 0 and status not in refund_on and UPSTREAM_ERROR not in state
        finally:
            upstream_status = state.get(UPSTREAM_STATUS, status or None)
            latency = state.get(UPSTREAM_LATENCY_MS)
            if latency is None:
                latency = (time.perf_counter() - started) * 1000
            # Only a charged response is kept: a refund deletes the key (lua/settle.lua), so
            # the client's retry is forwarded and charged like a first request.
            self.meter.settle_nowait(
                adm, ok=ok, status=upstream_status, latency_ms=round(latency),
                idempotency_key=idem_key, response=capture.stored() if ok else None,
            )  # fmt: skip
            self.counters.count(adm.feature, "charged" if ok else "refunded", adm.cost if ok else 0)
            if self.access_log:
                self._log_access(scope, match, ident, adm, ok, status, started)

    async def _not_admitted(
        self, scope: Scope, send: Send, match: RouteMatch, ident: Identity, adm: Admission
    ) -> None:
        """Answer a request that was not admitted: a repeat of a completed Idempotency-Key
        gets its stored response back (contract A9), anything else a refusal."""
        if adm.status == "replay":
            stored = adm.replay
            if stored is not None:
                self.counters.count(match.feature, "replayed")
                await send_replay(send, stored)
                self._log_refused(scope, match, ident, stored.status, "replayed")
                return
        self.counters.count(match.feature, "refused_" + adm.status)
        await self._refuse(scope, send, match, ident, adm)

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), send)
        elif scope["type"] == "websocket":
            await self.app(self._cleaned(scope, None), receive, send)
        else:
            await self.app(scope, receive, send)

    def _cleaned(self, scope: Scope, path: str | None) -> Scope:
        """``scope``, or a copy without the headers the policy removes (``path``: the
        normalised path, None when the router refused it)."""
        headers = self.headers.clean(scope["headers"])[0]
        if headers is None:
            return scope
        api = self._api_prefix
        if path is not None and (path == api or path.startswith(api + "/")):
            headers = self._api_headers.clean(scope["headers"])[0]
            if headers is None:
                return scope
        cleaned = dict(scope)
        cleaned["headers"] = headers
        return cleaned

    def _inner_scope(
        self,
        scope: Scope,
        headers: list[Header] | None,
        path: str,
        encoded_path: bytes,
        ident: Identity,
        match: RouteMatch,
        rid: Header,
    ) -> Scope:
        """The scope the app sees: the normalised path (the one matched and metered), the
        cleaned headers plus the caller's identity, and the outer scope's state."""
        headers = list(scope["headers"]) if headers is None else headers
        # The identity's two headers, encoded once per identity and kept with it.
        ours = ident.inner_headers
        if ours is None:
            user = ident.user
            ours = (
                (b"x-creditgate-org", ident.org.encode()),
                (b"x-creditgate-user", user.encode() if user else b""),
            )
            object.__setattr__(ident, "inner_headers", ours)  # (frozen: not its value)
        headers += ours
        headers += (self._feature_header[match.feature], rid)
        inner = dict(scope)
        inner["path"] = path
        inner["raw_path"] = encoded_path
        inner["headers"] = headers
        state: MutableMapping[str, Any] = scope.setdefault("state", {})
        inner["state"] = state
        return inner

    def _charged_headers(self, adm: Admission, rid: Header) -> list[Header]:
        """The response headers of an admitted request: cost, remaining, id, rate limit."""
        cost_header = self._cost_header.get(adm.cost)
        if cost_header is None:
            cost_header = self._cost_header[adm.cost] = (b"x-tokens-cost", str(adm.cost).encode())
        # b"%d" % n: one bytes object, where str(n).encode() makes a str first.
        left = adm.remaining
        remaining = (b"x-tokens-remaining", str(left).encode() if left is None else b"%d" % left)
        limit = adm.limit
        if limit is None:
            return [cost_header, remaining, rid]
        limit_header = self._limit_header.get(limit)
        if limit_header is None:
            limit_header = (b"ratelimit-limit", str(limit).encode())
            if len(self._limit_header) < 1000:
                self._limit_header[limit] = limit_header
        limit_left, reset_ms = adm.limit_remaining, adm.limit_reset_ms
        return [
            cost_header, remaining, rid, limit_header,
            (b"ratelimit-remaining",
             str(limit_left).encode() if limit_left is None else b"%d" % limit_left),
            # refusals.seconds, inlined: milliseconds to whole seconds, rounded up.
            (b"ratelimit-reset", b"%d" % -(-reset_ms // 1000) if reset_ms else b"0"),
        ]  # fmt: skip

    @staticmethod
    def _log_access(
        scope: Scope,
        match: RouteMatch,
        ident: Identity,
        adm: Admission,
        ok: bool,
        status: int,
        started: float,
    ) -> None:
        """The access line of an admitted request, written once it is settled."""
        log_access(
            request_id=adm.request_id, method=scope["method"], route=match.template,
            org=ident.org, user=ident.user, feature=match.feature, status=status,
            cost=adm.cost if ok else 0, refunded=not ok,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
            upstream_status=scope["state"].get(UPSTREAM_STATUS),
        )  # fmt: skip

    def _could_be_metered(self, method: str, raw_path: bytes) -> bool:
        """Would a lenient reading of a refused path hit a metered route?"""
        lenient = unquote_to_bytes(raw_path).replace(b"\\", b"/")
        lenient = bytes(c for c in lenient if c >= 0x20 and c != 0x7F)
        try:
            path = normalize_path(lenient.decode("latin-1"))
        except BadPath:
            return True
        return (
            self.router.match(method, path) is not None
            or self.router.match(method, strip_path_params(path)) is not None
        )

    # --- answers without the app ----------------------------------------------------------

    async def _identity_unavailable(
        self, scope: Scope, send: Send, match: RouteMatch, exc: Exception
    ) -> None:
        await send_problem(
            send, 503, "unavailable", "Service unavailable",
            f"Credentials cannot be checked right now: {exc}",
            headers=[(b"retry-after", str(self.retry_unavailable).encode())],
            retry_after=self.retry_unavailable,
        )  # fmt: skip
        self._log_refused(scope, match, None, 503, "unavailable")

    async def _unauthenticated(
        self, scope: Scope, send: Send, match: RouteMatch, ident: IdentityFailure
    ) -> None:
        hdrs: list[Header] = [(b"www-authenticate", b'Bearer realm="creditgate"')]
        if ident.retry_after is not None:
            hdrs.append((b"retry-after", str(ident.retry_after).encode()))
        title = "Too many bad credentials" if ident.status == 429 else "Unauthenticated"
        code = "rate_limited" if ident.status == 429 else "unauthenticated"
        await send_problem(
            send, ident.status, code, title, ident.detail, headers=hdrs,
            feature=match.feature, retry_after=ident.retry_after,
        )  # fmt: skip
        self._log_refused(scope, match, None, ident.status, code)

    async def _duplicate_idempotency_key(
        self, scope: Scope, send: Send, match: RouteMatch, ident: Identity
    ) -> None:
        # The gateway would dedupe on one key and the app on the other: refuse the request
        # before anything is charged instead of guessing which one the client meant.
        await send_problem(
            send, 400, "bad_request", "Bad request",
            "More than one Idempotency-Key header: send at most one",
            feature=match.feature,
        )  # fmt: skip
        self._log_refused(scope, match, ident, 400, "bad_request")

    async def _refuse(
        self, scope: Scope, send: Send, match: RouteMatch, ident: Identity, adm: Admission
    ) -> None:
        r = describe_refusal(adm)
        headers = [(k.lower().encode(), v.encode()) for k, v in r.headers]
        await send_problem(send, r.status, r.code, r.title, r.detail, headers=headers, **r.facts)
        self._log_refused(scope, match, ident, r.status, r.code)

    async def _unavailable(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        match: RouteMatch,
        ident: Identity,
        reason: str,
    ) -> None:
        if self.fail_open:
            # Let the request through uncharged and count it, as configured.
            self.fail_open_count += 1
            self.counters.count(match.feature, "fail_open")
            log.warning(
                "fail_open: %s %s passed uncharged: %s", scope["method"], match.template, reason
            )
            await self.app(scope, receive, send)
            return
        self.counters.count(match.feature, "refused_unavailable")
        log.error(
            "metering unavailable, refusing %s %s: %s", scope["method"], match.template, reason
        )
        await send_problem(
            send, 503, "unavailable", "Metering unavailable",
            "Token balances cannot be checked right now; retry shortly",
            headers=[(b"retry-after", str(self.retry_unavailable).encode())],
            feature=match.feature, retry_after=self.retry_unavailable,
        )  # fmt: skip
        self._log_refused(scope, match, ident, 503, "unavailable")

    def _log_refused(
        self, scope: Scope, match: RouteMatch, ident: Identity | None, status: int, code: str
    ) -> None:
        """The access line of a metered request answered by creditgate (nothing charged)."""
        if self.access_log:
            log_access(
                request_id=REQUEST_ID.get(), method=scope["method"], route=match.template,
                org=ident.org if ident else None, user=ident.user if ident else None,
                feature=match.feature, status=status, cost=0, refunded=False, code=code,
            )  # fmt: skip

    def _lifespan_receive(self, receive: Receive) -> Receive:
        gate = self.gate

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await gate.close()
            return message

        return wrapped

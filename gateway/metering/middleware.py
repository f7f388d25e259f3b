"""``CreditGateMiddleware``: meters an ASGI app's AI routes (DESIGN A1 middleware, A3).

A pure ASGI middleware in the manner of ``starlette/middleware/``: the instance holds the
config, all per-request state lives in locals, ``send`` is wrapped to add headers and to
see the status, and bodies are never buffered. The reverse proxy is this middleware in
front of ``UpstreamProxy``.

Per metered request: normalise the path and match a route (in process), identify the
caller (in process on a cache hit), one EVALSHA to admit, call the app, then queue the
settle (charge, or refund on a 5xx / upstream failure) without waiting for it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import Config
from gateway.core.counters import METRICS
from gateway.core.errors import IdentityUnavailable, LedgerUnavailable, RedisUnavailable
from gateway.core.logs import REQUEST_ID
from gateway.core.problem import send_problem
from gateway.identity.identifier import IdentityFailure
from gateway.metering.gate import CreditGate
from gateway.metering.meter import Admission, new_request_id
from gateway.metering.refusals import describe_refusal, seconds
from gateway.routing.paths import AmbiguousPath, BadPath, normalize_path, strip_path_params
from gateway.routing.router import RouteMatch

log = logging.getLogger("creditgate.middleware")

_STRIPPED_PREFIX = b"x-creditgate-"
_IDEMPOTENCY = b"idempotency-key"
_UNAVAILABLE = (IdentityUnavailable, RedisUnavailable, LedgerUnavailable)


class CreditGateMiddleware:
    """Meter the routes of ``config`` in front of ``app``.

    ``app.add_middleware(CreditGateMiddleware, config="creditgate.yaml")`` in Starlette or
    FastAPI, or ``CreditGateMiddleware(app, gate=CreditGate.from_config(...))``. The app's
    own auth may name the caller by setting ``scope["state"]["creditgate_org"]`` (and
    ``"creditgate_user"``) in an outer middleware.
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
        self.app = app
        self.gate = gate
        self.router = gate.router
        self.meter = gate.meter
        self.identifier = gate.identifier
        self.fail_open = gate.config.fail_open
        self.retry_unavailable = gate.config.retry_after_unavailable_seconds
        self.fail_open_count = 0
        # Header values that only depend on the route, encoded once.
        self._feature_header = {
            name: (b"x-creditgate-feature", name.encode()) for name in gate.config.features
        }
        self._cost_header: dict[int, tuple[bytes, bytes]] = {}
        self._limit_header: dict[int, tuple[bytes, bytes]] = {}  # a limiter's count: few

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, self._lifespan_receive(receive), send)
                return
            await self.app(scope, receive, send)
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
            await self.app(scope, receive, send)  # unmetered: passes through untouched
            return
        if match is None:
            await self.app(scope, receive, send)
            return

        # The metered path, inlined here rather than split into helpers: every coroutine
        # layer costs a frame on each await and each resume of the request's task.
        try:
            ident = self.identifier.identify_nowait(scope)
            if ident is None:
                ident = await self.identifier.identify(scope)
        except _UNAVAILABLE as exc:
            METRICS.count(match.feature, "refused_unavailable")
            await self._identity_unavailable(send, exc)
            return
        if isinstance(ident, IdentityFailure):
            METRICS.count(
                match.feature,
                "refused_unauthenticated" if ident.status == 401 else "refused_bad_credentials",
            )
            await self._unauthenticated(send, match, ident)
            return
        org = ident.org
        user = ident.user
        # Spoofed identity headers are dropped; the client's Idempotency-Key is read. Most
        # requests have no header name starting with "x" or "i", so neither: one cheap
        # pass and a copy then, instead of the filtering loop (~0.3 µs less).
        headers: list[tuple[bytes, bytes]]
        idem_key: str | None = None
        plain = True
        try:
            for name, _ in scope["headers"]:
                first = name[0]
                if first == 120 or first == 105:  # b"x", b"i"
                    plain = False
                    break
        except IndexError:  # an empty name: let the loop below handle it
            plain = False
        if plain:
            headers = list(scope["headers"])
        else:
            headers = []
            for header in scope["headers"]:
                name = header[0]
                if name.startswith(_STRIPPED_PREFIX):
                    continue
                if name == _IDEMPOTENCY and header[1]:
                    idem_key = header[1].decode("latin-1")
                headers.append(header)
        request_id = new_request_id()
        REQUEST_ID.set(request_id)  # every log line of this request carries it
        rid = (b"x-creditgate-request-id", request_id.encode())
        headers += (
            (b"x-creditgate-org", org.encode()),
            (b"x-creditgate-user", user.encode() if user else b""),
            self._feature_header[match.feature],
            rid,
        )
        # The app sees the normalised path: the same one that was matched and metered.
        inner = dict(scope)
        inner["path"] = path
        inner["raw_path"] = encoded_path
        inner["headers"] = headers
        state: MutableMapping[str, Any] = scope.setdefault("state", {})
        inner["state"] = state
        try:
            adm = await self.meter.admit(
                org, match.feature, user=user, cost=match.cost, idempotency_key=idem_key,
                request_id=request_id, method=scope["method"], route=match.template,
            )  # fmt: skip
        except (RedisUnavailable, LedgerUnavailable) as exc:
            await self._unavailable(inner, receive, send, match, str(exc))
            return
        if adm.status != "ok":
            METRICS.count(match.feature, "refused_" + adm.status)
            await self._refuse(send, adm)
            return
        cost_header = self._cost_header.get(adm.cost)
        if cost_header is None:
            cost_header = self._cost_header[adm.cost] = (b"x-tokens-cost", str(adm.cost).encode())
        remaining = (b"x-tokens-remaining", str(adm.remaining).encode())
        limit = adm.limit
        if limit is not None:
            limit_header = self._limit_header.get(limit)
            if limit_header is None:
                limit_header = (b"ratelimit-limit", str(limit).encode())
                if len(self._limit_header) < 1000:
                    self._limit_header[limit] = limit_header
            extra = [
                cost_header, remaining, rid, limit_header,
                (b"ratelimit-remaining", str(adm.limit_remaining).encode()),
                (b"ratelimit-reset", str(seconds(adm.limit_reset_ms)).encode()),
            ]  # fmt: skip
        else:
            extra = [cost_header, remaining, rid]
        status = 0
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        ok = False
        try:
            await self.app(inner, receive, send_wrapper)
            # Charged only for success: a 5xx (the proxy's 502/504 included) or an upstream
            # that failed mid-body refunds.
            ok = 0 < status < 500 and "creditgate.upstream_error" not in state
        finally:
            upstream_status = state.get("creditgate.upstream_status", status or None)
            latency = state.get("creditgate.upstream_latency_ms")
            if latency is None:
                latency = (time.perf_counter() - started) * 1000
            self.meter.settle_nowait(
                adm, ok=ok, status=upstream_status, latency_ms=round(latency),
                idempotency_key=idem_key,
            )  # fmt: skip
            METRICS.count(adm.feature, "charged" if ok else "refunded", adm.cost if ok else 0)

    def _could_be_metered(self, method: str, raw_path: bytes) -> bool:
        """Would a lenient reading of a refused path hit a metered route?"""
        from urllib.parse import unquote_to_bytes

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

    async def _identity_unavailable(self, send: Send, exc: Exception) -> None:
        await send_problem(
            send, 503, "unavailable", "Service unavailable",
            f"Credentials cannot be checked right now: {exc}",
            headers=[(b"retry-after", str(self.retry_unavailable).encode())],
            retry_after=self.retry_unavailable,
        )  # fmt: skip

    async def _unauthenticated(self, send: Send, match: RouteMatch, ident: IdentityFailure) -> None:
        hdrs: list[tuple[bytes, bytes]] = [(b"www-authenticate", b'Bearer realm="creditgate"')]
        if ident.retry_after is not None:
            hdrs.append((b"retry-after", str(ident.retry_after).encode()))
        title = "Too many bad credentials" if ident.status == 429 else "Unauthenticated"
        code = "rate_limited" if ident.status == 429 else "unauthenticated"
        await send_problem(
            send, ident.status, code, title, ident.detail, headers=hdrs,
            feature=match.feature, retry_after=ident.retry_after,
        )  # fmt: skip

    async def _refuse(self, send: Send, adm: Admission) -> None:
        r = describe_refusal(adm)
        headers = [(k.lower().encode(), v.encode()) for k, v in r.headers]
        await send_problem(send, r.status, r.code, r.title, r.detail, headers=headers, **r.facts)

    async def _unavailable(
        self, scope: Scope, receive: Receive, send: Send, match: RouteMatch, reason: str
    ) -> None:
        if self.fail_open:
            # Let the request through uncharged and count it, as configured.
            self.fail_open_count += 1
            METRICS.count(match.feature, "fail_open")
            log.warning(
                "fail_open: %s %s passed uncharged: %s", scope["method"], match.template, reason
            )
            await self.app(scope, receive, send)
            return
        METRICS.count(match.feature, "refused_unavailable")
        log.error(
            "metering unavailable, refusing %s %s: %s", scope["method"], match.template, reason
        )
        await send_problem(
            send, 503, "unavailable", "Metering unavailable",
            "Token balances cannot be checked right now; retry shortly",
            headers=[(b"retry-after", str(self.retry_unavailable).encode())],
            feature=match.feature, retry_after=self.retry_unavailable,
        )  # fmt: skip

    def _lifespan_receive(self, receive: Receive) -> Receive:
        gate = self.gate

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await gate.close()
            return message

        return wrapped

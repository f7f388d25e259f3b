"""Step 3 of loading a config (:mod:`.loader`): the meaning checks (references between
features, plans, buckets and routes; rate strings; templates; URLs), collecting every
error as ``key.path: message``. Structure errors are :mod:`.structure`'s."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Container, Iterable, Mapping
from typing import Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.config.alerts import alerts_errors
from gateway.config.costs import price_table_errors, variable_cost_errors
from gateway.config.refunds import parse_refund_entry
from gateway.config.schema import Config, parse_rate
from gateway.config.source import fmt_loc
from gateway.core.caps import LEVELS, parse_cap
from gateway.core.redis_urls import parse_redis_url
from gateway.routing.paths import BadPath, normalize_path
from gateway.routing.templates import route_table_errors

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
_JWT_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    | {"ES256", "ES384", "ES512", "EdDSA"}
)
_MAX_TOKENS = 2**53  # Lua numbers are doubles: integers are exact up to here

Mode = Literal["proxy", "middleware"]
"""How the config will be used: ``proxy`` (``creditgate serve``) also needs ``upstream``."""

PROXY_NEEDS_UPSTREAM = (
    "required to run the proxy (creditgate serve): the URL of the app to forward requests"
    " to, e.g. upstream: http://127.0.0.1:9000 (for a config used only as middleware or"
    " library, check it with --mode middleware)"
)


class Checker:
    """Checks what pydantic cannot: cross-references, formats, ranges. Collects every error."""

    def __init__(
        self,
        config: Config,
        unset: dict[str, list[str]],
        unchecked: Mapping[str, Container[str]] | None = None,
        mode: Mode | None = None,
    ) -> None:
        self.c, self.unset, self.mode = config, unset, mode
        # Names (of kind feature, bucket, plan) that entries with structure errors define:
        # a reference to one is neither right nor wrong (see gateway.config.structure).
        self.unchecked: Mapping[str, Container[str]] = unchecked or {}
        self.errors: list[str] = []

    def err(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def filled(self, path: str, value: str | None) -> bool:
        """False (and an error naming any unset variable) when a given value is empty."""
        if value is None or value.strip():
            return True
        names = self.unset.get(path)
        why = f" (environment variable {', '.join(names)} is not set)" if names else ""
        self.err(path, f"empty{why}")
        return False

    def name(self, path: str, value: str, what: str) -> None:
        if _NAME.fullmatch(value) is None:
            self.err(path, f"invalid {what} name {value!r} (letters, digits, _ . -; at most 64)")

    def number(self, path: str, value: float, low: float, high: float | None = None) -> None:
        if not value >= low:  # also catches NaN
            want = {0: "must not be negative", 1: "must be positive"}.get(int(low))
            self.err(path, f"{want or f'must be at least {low}'}, got {value}")
        elif high is not None and value > high:
            self.err(path, f"must be at most {high}, got {value}")

    def url(self, path: str, value: str | None, schemes: tuple[str, ...], host: bool) -> None:
        if not self.filled(path, value) or value is None:
            return
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            self.err(path, f"invalid URL {value!r}: {exc}")
            return
        if parts.scheme not in schemes:
            self.err(path, f"URL scheme must be one of {', '.join(schemes)}, got {value!r}")
        elif host and not parts.hostname:
            self.err(path, f"URL has no host: {value!r}")

    def redis_url(self, value: str) -> None:
        """``redis_url`` through the parser that builds the connection
        (gateway/core/redis_urls.py): a generic URL parser refuses the cluster form's
        seed list (``h1:7000,h2:7001``) and would pass what the connection cannot use."""
        if not self.filled("redis_url", value):
            return
        try:
            parse_redis_url(value)
        except ValueError as exc:
            self.err("redis_url", str(exc))

    def known(self, path: str, value: str, kind: str, known: Iterable[str]) -> bool:
        if value in known:
            return True
        if value in self.unchecked.get(kind, ()):
            return False
        names = ", ".join(sorted(known)) or "none"
        self.err(path, f"unknown {kind} {value!r} (known: {names})")
        return False

    def run(self) -> list[str]:
        c = self.c
        self.redis_url(c.redis_url)
        self.url("database_url", c.database_url, ("postgresql", "postgres"), host=False)
        if c.upstream is not None:
            self.url("upstream", c.upstream, ("http", "https"), host=True)
        elif self.mode == "proxy":
            self.err("upstream", PROXY_NEEDS_UPSTREAM)
        self.filled("admin_token", c.admin_token)
        self.identity()
        self.server()
        self.models()
        self.features()
        self.plans()
        self.billing()
        self.period()
        self.alerts()
        self.routes()
        if self.filled("key_prefix", c.key_prefix) and re.search(r"[{}\s]", c.key_prefix):
            self.err("key_prefix", f"must not contain braces or spaces, got {c.key_prefix!r}")
        self.number("shards", c.shards, 1, 16384)
        if not c.api_prefix.startswith("/") or c.api_prefix == "/":
            self.err("api_prefix", f"must start with '/' and not be '/', got {c.api_prefix!r}")
        elif _normal_or_none(c.api_prefix) != c.api_prefix:
            self.err("api_prefix", f"must be a normalised path, got {c.api_prefix!r}")
        for key in (
            "idempotency_ttl_seconds",
            "hold_ttl_seconds",
            "retry_after_unavailable_seconds",
        ):
            self.number(key, getattr(c, key), 1)
        # WAIT 0 would mean "no replica needed" (off); more than a few replicas is a typo.
        self.number("settle_wait_replicas", c.settle_wait_replicas, 0, 16)
        self.number("settle_wait_timeout_ms", c.settle_wait_timeout_ms, 1, 60_000)
        # 0 stores no body: every repeat of a completed request gets 409, never a replay.
        self.number("idempotency_max_body_bytes", c.idempotency_max_body_bytes, 0, 16 << 20)
        for key in (
            "upstream_timeout_seconds",
            "upstream_connect_timeout_seconds",
            "redis_timeout_seconds",
        ):
            if not getattr(c, key) > 0:
                self.err(key, f"must be positive, got {getattr(c, key)}")
        # Each connection is a file descriptor, with a client socket beside it: a million
        # is past any process's hard limit, so a larger number is a typo.
        self.number("upstream_max_connections", c.upstream_max_connections, 1, 1_000_000)
        if not 0 <= c.upstream_pool_wait_seconds < float("inf"):  # also catches NaN
            self.err(
                "upstream_pool_wait_seconds",
                f"must be 0 or more (and finite), got {c.upstream_pool_wait_seconds}",
            )
        if not c.usage_drain_seconds >= 0:
            self.err("usage_drain_seconds", f"must be 0 or more, got {c.usage_drain_seconds}")
        return self.errors

    def period(self) -> None:
        """Contract A12: a time zone zoneinfo knows; an anchor day only for months."""
        p = self.c.period
        try:
            ZoneInfo(p.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            self.err(
                "period.timezone",
                f"unknown time zone {p.timezone!r} (an IANA name, e.g. UTC, Europe/Paris,"
                " America/New_York)",
            )
        if p.anchor != "calendar" and p.every != "month":
            self.err(
                "period.anchor",
                f"anchor {p.anchor!r} needs every: month (an org's anchor is a day of the"
                f" month), got every: {p.every}",
            )

    def identity(self) -> None:
        ident = self.c.identity
        self.number("identity.bad_credentials_per_minute", ident.bad_credentials_per_minute, 0)
        self.number("identity.key_cache_seconds", ident.key_cache_seconds, 0)
        for i, cidr in enumerate(ident.trusted_proxies):
            self.network(f"identity.trusted_proxies[{i}]", cidr)
        jwt = ident.jwt
        if jwt is None:
            return
        if jwt.secret is not None:
            self.filled("identity.jwt.secret", jwt.secret)
        if jwt.jwks_url is not None:
            self.url("identity.jwt.jwks_url", jwt.jwks_url, ("http", "https"), host=True)
        has_secret, has_jwks = jwt.secret is not None, jwt.jwks_url is not None
        if has_secret and has_jwks:
            self.err("identity.jwt", "set only one of secret or jwks_url")
            has_secret = has_jwks = False  # which algorithms fit is unknowable: skip that check
        elif not has_secret and not has_jwks:
            self.err("identity.jwt", "needs one of secret or jwks_url")
        if not jwt.algorithms:
            self.err("identity.jwt.algorithms", "must not be empty")
        for i, alg in enumerate(jwt.algorithms):
            path = f"identity.jwt.algorithms[{i}]"
            if self.known(path, alg, "algorithm", _JWT_ALGORITHMS):
                # A shared-secret algorithm with a key set (or the reverse) is the classic
                # algorithm-confusion hole: refuse the mix.
                if alg.startswith("HS") and has_jwks:
                    self.err(path, f"{alg} needs a secret, not a jwks_url")
                elif not alg.startswith("HS") and has_secret:
                    self.err(path, f"{alg} needs a jwks_url, not a secret")
        self.filled("identity.jwt.org_claim", jwt.org_claim)
        if jwt.team_claim is not None:
            self.filled("identity.jwt.team_claim", jwt.team_claim)
        self.filled("identity.jwt.user_claim", jwt.user_claim)
        self.number("identity.jwt.leeway_seconds", jwt.leeway_seconds, 0)

    def network(self, path: str, value: str) -> None:
        """A CIDR or single address, parsed as gateway.identity.client_address does."""
        try:
            ipaddress.ip_network(value)
        except ValueError as exc:
            if "has host bits set" in str(exc):
                # 10.0.0.1/8: a typo for 10.0.0.0/8, or one host meant? Ask, do not guess.
                network = ipaddress.ip_network(value, strict=False)
                self.err(path, f"{value!r} has host bits set (did you mean {network}?)")
            else:
                self.err(path, f"not an IP address or CIDR: {value!r}")

    def server(self) -> None:
        srv = self.c.server
        self.number("server.max_request_header_bytes", srv.max_request_header_bytes, 1024)
        self.number("server.max_request_headers", srv.max_request_headers, 1)
        for key in ("header_read_timeout_seconds", "keep_alive_timeout_seconds"):
            if not 0 < getattr(srv, key) < float("inf"):  # also catches NaN
                self.err(f"server.{key}", f"must be positive, got {getattr(srv, key)}")

    def features(self) -> None:
        for name, feature in self.c.features.items():
            path = fmt_loc(("features", name))
            self.name(path, name, "feature")
            if feature.bucket is not None:
                self.name(f"{path}.bucket", feature.bucket, "bucket")
            if feature.variable is None:
                self.number(f"{path}.cost", feature.cost, 1, _MAX_TOKENS)
            else:  # usage or header (contract A8): gateway.config.costs words its errors
                has_models = self.c.models is not None
                for where, message in variable_cost_errors(feature.variable, has_models=has_models):
                    self.err(f"{path}.cost{where}", message)
            for i, entry in enumerate(feature.refund_on):
                try:
                    parse_refund_entry(entry)
                except ValueError as exc:
                    self.err(f"{path}.refund_on[{i}]", str(exc))

    def models(self) -> None:
        """The ``models:`` price table (contract A8), every bad entry reported."""
        if self.c.models is not None:
            for where, message in price_table_errors(self.c.models):
                self.err(where, message)

    def plans(self) -> None:
        buckets = self.c.buckets
        for name, plan in self.c.plans.items():
            path = fmt_loc(("plans", name))
            self.name(path, name, "plan")
            for bucket, amount in plan.allocations.items():
                apath = fmt_loc(("plans", name, "allocations", bucket))
                if bucket not in buckets and bucket not in self.unchecked.get("bucket", ()):
                    names = ", ".join(buckets) or "none"
                    self.err(
                        apath,
                        f"unknown bucket {bucket!r}: no feature draws from it (buckets: {names})",
                    )
                self.number(apath, amount, 0, _MAX_TOKENS)
            for level in LEVELS:
                cap = getattr(plan.caps, level)
                if cap is not None:
                    try:
                        parse_cap(cap)
                    except ValueError as exc:
                        self.err(fmt_loc(("plans", name, "caps", level)), str(exc))
            seen: dict[str, int] = {}
            for i, rl in enumerate(plan.rate_limits):
                try:
                    count, period_ms = parse_rate(rl.limit)
                except ValueError as exc:
                    self.err(f"{path}.rate_limits[{i}].limit", str(exc))
                    continue
                rid = f"{rl.per}:{count}/{period_ms}"
                if rid in seen:
                    self.err(
                        f"{path}.rate_limits[{i}]", f"duplicate of {path}.rate_limits[{seen[rid]}]"
                    )
                seen.setdefault(rid, i)
        self.known("default_plan", self.c.default_plan, "plan", self.c.plans)

    def billing(self) -> None:
        stripe = self.c.billing.stripe
        if stripe is None:
            return
        self.filled("billing.stripe.webhook_secret", stripe.webhook_secret)
        self.number("billing.stripe.tolerance_seconds", stripe.tolerance_seconds, 1)
        for price, plan in stripe.plans.items():
            self.known(fmt_loc(("billing", "stripe", "plans", price)), plan, "plan", self.c.plans)
        for price, topup in stripe.topups.items():
            path = fmt_loc(("billing", "stripe", "topups", price))
            self.known(f"{path}.bucket", topup.bucket, "bucket", self.c.buckets)
            self.number(f"{path}.amount", topup.amount, 1, _MAX_TOKENS)
            if topup.expires_in_days is not None:
                self.number(f"{path}.expires_in_days", topup.expires_in_days, 1)

    def alerts(self) -> None:
        alerts = self.c.alerts
        if alerts is None:
            return
        if alerts.webhook_url is not None:
            self.url("alerts.webhook_url", alerts.webhook_url, ("http", "https"), host=True)
        self.filled("alerts.webhook_secret", alerts.webhook_secret)
        for path, message in alerts_errors(alerts):
            self.err(path, message)

    def routes(self) -> None:
        for i, route in enumerate(self.c.routes):
            known = self.known(f"routes[{i}].feature", route.feature, "feature", self.c.features)
            if route.cost is not None:
                self.number(f"routes[{i}].cost", route.cost, 1, _MAX_TOKENS)
                feature = self.c.features[route.feature] if known else None
                if feature is not None and feature.variable is not None:
                    # A fixed cost for a call whose charge is decided after the response:
                    # neither a reserve nor a cap, so refused rather than guessed at.
                    self.err(
                        f"routes[{i}].cost",
                        f"feature {route.feature!r} has a {feature.variable.mode} cost"
                        f" ({fmt_loc(('features', route.feature, 'cost'))}): a route cannot give"
                        " it a fixed cost",
                    )
        self.errors.extend(route_table_errors(self.c.routes, self.c.routes_ignore_case))


def _normal_or_none(path: str) -> str | None:
    try:
        return normalize_path(path)
    except BadPath:
        return None

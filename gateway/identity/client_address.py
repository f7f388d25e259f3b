"""The address of the client behind a request, through trusted proxies (load balancers).

The TCP peer (``scope["client"]``) is the client unless it is one of the configured
``identity.trusted_proxies``; only then is the one configured forwarding header read:

- ``X-Forwarded-For: client, proxy1, proxy2`` (each proxy appends the peer it saw), or
- RFC 7239 ``Forwarded: for=192.0.2.60;proto=https, for="[2001:db8::17]:4711"``.

The list is read from the right, skipping addresses that are themselves trusted proxies:
the first one that is not is the client. Everything to its left was written by the client
(or by proxies we do not know) and may be forged, so it is never used. When every hop is
trusted the left-most one is the client (a request from inside the trusted network). A hop
that is not an IP address (``unknown``, an obfuscated ``_node``, garbage) ends the walk:
what that proxy saw cannot be known, so the TCP peer is used.

Only one header is read, never both: a balancer that appends to ``X-Forwarded-For`` passes
a client's own ``Forwarded`` header through untouched (and the reverse), so reading the
other one would let the client choose its address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_host(scope: Any) -> str | None:
    """The TCP peer's host as the server reported it, or None (Unix socket, unknown)."""
    client = scope.get("client")
    return str(client[0]) if client else None


def parse_ip(text: str) -> IPAddress | None:
    """An address as proxies write it (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``).

    IPv4-mapped IPv6 (``::ffff:10.0.0.1``, what a dual-stack socket reports) becomes the
    IPv4 address. None when it is not an IP address.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end == -1 or (end + 1 < len(text) and text[end + 1] != ":"):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has several colons
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` where it is not inside a quoted-string."""
    parts: list[str] = []
    start, quoted, escaped = 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out, escaped = [], False
        for char in inner:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value


def forwarded_for(header: str) -> list[str | None]:
    """The ``for=`` value of each element of an RFC 7239 ``Forwarded`` header, in order.

    None for an element without a (single, well-formed) ``for`` parameter.
    """
    hops: list[str | None] = []
    for element in _split_outside_quotes(header, ","):
        found: str | None = None
        count = 0
        for pair in _split_outside_quotes(element, ";"):
            name, sep, value = pair.partition("=")
            if sep and name.strip().lower() == "for":
                found, count = _unquote(value), count + 1
        hops.append(found if count == 1 else None)
    return hops


class TrustedProxies:
    """Finds a request's client address given the proxies whose headers are believed."""

    def __init__(
        self,
        cidrs: Iterable[str] = (),
        header: Literal["X-Forwarded-For", "Forwarded"] = "X-Forwarded-For",
    ) -> None:
        # Validated at config load (gateway.config.checks); ValueError here otherwise.
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(c) for c in cidrs)
        self.header = header
        self._name = header.lower().encode("ascii")

    def trusted(self, ip: IPAddress) -> bool:
        """Whether ``ip`` is one of the trusted proxies."""
        return any(ip in network for network in self.networks)

    def client_host(self, scope: Any) -> str | None:
        """The client's address (see the module docstring), or None when unknown."""
        peer = peer_host(scope)
        if not self.networks or peer is None:
            return peer
        peer_ip = parse_ip(peer)
        if peer_ip is None or not self.trusted(peer_ip):
            return peer
        values = [v for n, v in scope.get("headers") or () if n == self._name]
        if not values:
            return peer
        # Several header lines are one list, in order (RFC 9110 5.3).
        joined = ", ".join(v.decode("latin-1") for v in values)
        hops = forwarded_for(joined) if self._name == b"forwarded" else joined.split(",")
        ips: list[IPAddress] = []
        for hop in reversed(hops):
            ip = None if hop is None else parse_ip(hop)
            if ip is None:
                return peer
            if not self.trusted(ip):
                return str(ip)
            ips.append(ip)
        return str(ips[-1])  # every hop trusted: the farthest one

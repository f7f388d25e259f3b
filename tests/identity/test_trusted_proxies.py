"""The client address behind trusted proxies (gateway.identity.client_address) and the
bad-credential limiter keyed on it: separate limits for clients behind one balancer,
no escape by forged forwarding headers, IPv6 and RFC 7239 ``Forwarded`` forms, config
validation, and the whole path over TCP through a served gateway.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import yaml

from gateway.commands.server import GatewayApp
from gateway.config import ConfigError, parse_config
from gateway.identity.api_keys import generate_api_key
from gateway.identity.client_address import TrustedProxies, forwarded_for, parse_ip
from gateway.identity.identifier import IdentityFailure
from gateway.metering.gate import CreditGate
from tests.support.identity_helpers import (
    MakeIdentifier,
    bearer,
    identifier_factory,
    new_clock,
    new_fake_redis,
    new_store,
    scope,
)
from tests.support.reference import REFERENCE_YAML, reference_config
from tests.support.served_gateway import served

clock = pytest.fixture(new_clock)
store = pytest.fixture(new_store)
fake_redis = pytest.fixture(new_fake_redis)
make = pytest.fixture(identifier_factory)

BALANCER = ("10.0.0.5", 50000)


async def statuses(ident: Any, requests: list[tuple[list[tuple[bytes, bytes]], Any]]) -> list[int]:
    """The status of a bad-credential attempt for each (extra headers, peer)."""
    result = []
    for headers, peer in requests:
        failure = await ident.identify(scope([*bearer(generate_api_key()), *headers], client=peer))
        assert isinstance(failure, IdentityFailure)
        result.append(failure.status)
    return result


def xff(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", value.encode())]


def fwd(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"forwarded", value.encode())]


# --- the limiter behind a balancer --------------------------------------------------------


async def test_two_clients_behind_a_trusted_proxy_are_limited_separately(
    make: MakeIdentifier,
) -> None:
    alice, bob = xff("203.0.113.1"), xff("198.51.100.2")
    attempts = [(alice, BALANCER)] * 3 + [(bob, BALANCER)]
    # Without trusted_proxies every client is the balancer: Alice locks Bob out.
    assert await statuses(make(bad_credentials_per_minute=2), attempts) == [401, 401, 429, 429]
    ident = make(bad_credentials_per_minute=2, trusted_proxies=["10.0.0.0/8"])
    assert await statuses(ident, attempts) == [401, 401, 429, 401]


async def test_an_untrusted_peer_cannot_spoof_forwarding_headers(make: MakeIdentifier) -> None:
    ident = make(bad_credentials_per_minute=2, trusted_proxies=["10.0.0.0/8"])
    attacker = ("192.0.2.1", 40000)
    forged = [xff(f"203.0.113.{i}") + fwd(f"for=198.51.100.{i}") for i in range(4)]
    assert await statuses(ident, [(h, attacker) for h in forged]) == [401, 401, 429, 429]


async def test_a_client_cannot_escape_by_prepending_to_x_forwarded_for(
    make: MakeIdentifier,
) -> None:
    # The balancer appends the address it saw; what the client wrote is to its left.
    ident = make(bad_credentials_per_minute=2, trusted_proxies=["10.0.0.0/8"])
    forged = [xff(f"198.51.100.{i}, 203.0.113.7") for i in range(4)]
    assert await statuses(ident, [(h, BALANCER) for h in forged]) == [401, 401, 429, 429]


async def test_only_the_configured_header_is_read(make: MakeIdentifier) -> None:
    # The balancer writes Forwarded; a client's own X-Forwarded-For passes it untouched.
    ident = make(
        bad_credentials_per_minute=2, trusted_proxies=["10.0.0.0/8"], forwarded_header="Forwarded"
    )
    forged = [xff(f"198.51.100.{i}") + fwd("for=203.0.113.7") for i in range(3)]
    assert await statuses(ident, [(h, BALANCER) for h in forged]) == [401, 401, 429]
    assert await statuses(ident, [(fwd('for="[2001:db8::9]"'), BALANCER)]) == [401]


async def test_ipv6_clients_behind_a_proxy_are_grouped_by_64(make: MakeIdentifier) -> None:
    ident = make(bad_credentials_per_minute=2, trusted_proxies=["fd00::/8"])
    proxy = ("fd00::1", 443)
    same_64 = [xff(f"2001:db8:1:2::{i}") for i in range(1, 4)]
    assert await statuses(ident, [(h, proxy) for h in same_64]) == [401, 401, 429]
    assert await statuses(ident, [(xff("2001:db8:1:3::1"), proxy)]) == [401]


# --- the address rules ------------------------------------------------------------------------


def host(proxies: TrustedProxies, peer: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    return proxies.client_host({"client": (peer, 1), "headers": headers})


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("10.0.0.5", [], "10.0.0.5"),  # no header: the peer
        ("10.0.0.5", xff("203.0.113.7"), "203.0.113.7"),
        ("10.0.0.5", xff(" 203.0.113.7 , 10.1.1.1,10.2.2.2 "), "203.0.113.7"),  # trusted hops
        ("10.0.0.5", xff("1.1.1.1, 203.0.113.7, 10.1.1.1"), "203.0.113.7"),  # right-most
        ("10.0.0.5", xff("10.3.3.3, 10.1.1.1"), "10.3.3.3"),  # all trusted: the farthest
        ("10.0.0.5", xff("1.1.1.1") + xff("203.0.113.7"), "203.0.113.7"),  # two header lines
        ("10.0.0.5", xff("203.0.113.7:5555"), "203.0.113.7"),  # with a port
        ("10.0.0.5", xff("[2001:db8::7]:443"), "2001:db8::7"),
        ("10.0.0.5", xff("2001:DB8:0::7"), "2001:db8::7"),  # normalised
        ("10.0.0.5", xff("1.1.1.1, unknown"), "10.0.0.5"),  # not an address: the peer
        ("10.0.0.5", xff(""), "10.0.0.5"),
        ("10.0.0.5", fwd("for=203.0.113.7"), "10.0.0.5"),  # not the configured header
        ("::ffff:10.0.0.5", xff("203.0.113.7"), "203.0.113.7"),  # dual-stack peer
        ("fd00::1", xff("203.0.113.7"), "203.0.113.7"),
        ("192.0.2.1", xff("203.0.113.7"), "192.0.2.1"),  # untrusted peer: header ignored
        ("fd01::1", xff("203.0.113.7"), "fd01::1"),
    ],
)
def test_x_forwarded_for(peer: str, headers: list[tuple[bytes, bytes]], expected: str) -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "fd00::1"])
    assert host(proxies, peer, headers) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("for=192.0.2.60;proto=http;by=203.0.113.43", "192.0.2.60"),
        ('For="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
        ('for="[2001:db8:cafe::17]"', "2001:db8:cafe::17"),
        ('for="192.0.2.43:47011"', "192.0.2.43"),
        ("for=192.0.2.43, for=198.51.100.17", "198.51.100.17"),
        ("for=192.0.2.43, for=10.9.9.9", "192.0.2.43"),  # a trusted hop is skipped
        ('for=192.0.2.43, for="_hidden,;x", for=10.9.9.9', "10.0.0.5"),  # obfuscated
        ("for=unknown", "10.0.0.5"),
        ("proto=https", "10.0.0.5"),  # an element without for
        ("for=192.0.2.1;for=192.0.2.2", "10.0.0.5"),  # ambiguous
        ('for="\\"[2001:db8::1]\\""', "10.0.0.5"),  # escaped quotes are not an address
    ],
)
def test_rfc_7239_forwarded(value: str, expected: str) -> None:
    proxies = TrustedProxies(["10.0.0.0/8"], header="Forwarded")
    assert host(proxies, "10.0.0.5", fwd(value)) == expected
    assert host(proxies, "10.0.0.5", xff("203.0.113.7")) == "10.0.0.5"  # XFF not read


def test_parsing_helpers() -> None:
    assert forwarded_for('for="a,b";by=x, for=c') == ["a,b", "c"]
    assert forwarded_for("") == [None]
    assert parse_ip("[::1") is None and parse_ip("[::1]x") is None
    assert str(parse_ip("::ffff:192.0.2.7")) == "192.0.2.7"


def test_no_trusted_proxies_means_the_peer() -> None:
    assert host(TrustedProxies(), "10.0.0.5", xff("203.0.113.7")) == "10.0.0.5"
    assert TrustedProxies(["10.0.0.0/8"]).client_host({"client": None, "headers": []}) is None


# --- configuration ----------------------------------------------------------------------------


def test_trusted_proxies_are_validated_at_load_with_file_and_key() -> None:
    data = yaml.safe_load(REFERENCE_YAML)
    data["identity"]["trusted_proxies"] = ["10.0.0.0/8", "10.0.0.1/8", "lb.internal", "fd00::/8"]
    data["identity"]["forwarded_header"] = "x-forwarded-for"  # any case
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(data), "edge.yaml")
    assert info.value.errors == [
        "edge.yaml: identity.trusted_proxies[1]: '10.0.0.1/8' has host bits set"
        " (did you mean 10.0.0.0/8?)",
        "edge.yaml: identity.trusted_proxies[2]: not an IP address or CIDR: 'lb.internal'",
    ]
    data["identity"]["trusted_proxies"] = ["10.0.0.0/8", "192.0.2.7", "fd00::/8"]
    config = parse_config(yaml.safe_dump(data), "edge.yaml")
    assert config.identity.forwarded_header == "X-Forwarded-For"
    data["identity"]["forwarded_header"] = "X-Real-IP"
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(data), "edge.yaml")
    assert info.value.errors == [
        "edge.yaml: identity.forwarded_header: must be 'X-Forwarded-For' or 'Forwarded',"
        " got 'X-Real-IP'"
    ]


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("trusted", [False, True])
def test_over_tcp_behind_a_balancer(trusted: bool) -> None:
    """The test client plays the balancer at 127.0.0.1, forwarding for two clients (served
    as ``serve`` does: uvicorn's own X-Forwarded-For handling, which trusts 127.0.0.1 by
    default, is off)."""
    identity = {"api_keys": True, "bad_credentials_per_minute": 2}
    if trusted:
        identity["trusted_proxies"] = ["127.0.0.1"]  # type: ignore[assignment]
    config = reference_config(identity=identity)
    app = GatewayApp(CreditGate(config), upstream=lambda *a: None, sync=False)  # never reached
    with served(app, config) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:

        def attempt(client_ip: str) -> int:
            headers = {"X-API-Key": "cg_not_a_key", "X-Forwarded-For": client_ip}
            return client.post("/api/v1/leads/generate", headers=headers).status_code

        results = [attempt("203.0.113.1") for _ in range(3)] + [attempt("198.51.100.2")]
    assert results == ([401, 401, 429, 401] if trusted else [401, 401, 429, 429])

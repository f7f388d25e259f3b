"""Request identification (gateway.identity.identifier): each source, precedence, header spellings,
malformed input, and throttling of bad credentials. API key caching, outages and
revocation are in test_identity_keys.py; JWTs in test_identity_jwt.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.ttlcache import TtlCache
from gateway.identity.api_keys import generate_api_key
from gateway.identity.bad_credentials import BadCredentialLimiter, client_address
from gateway.identity.identifier import Identity, IdentityFailure
from tests.support.identity_helpers import (
    Clock,
    FakeStore,
    MakeIdentifier,
    bearer,
    identifier_factory,
    new_clock,
    new_fake_redis,
    new_store,
    scope,
)

clock = pytest.fixture(new_clock)
store = pytest.fixture(new_store)
fake_redis = pytest.fixture(new_fake_redis)
make = pytest.fixture(identifier_factory)


# --- sources and header spellings --------------------------------------------------------


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER"])
async def test_api_key_in_authorization_any_scheme_case(
    make: MakeIdentifier, store: FakeStore, scheme: bytes
) -> None:
    key, row = store.add(org="org-a", user="u-7")
    result = await make().identify(scope([(b"authorization", scheme + b" " + key.encode())]))
    assert result == Identity("org-a", "u-7", "api_key", row.id)


async def test_api_key_in_x_api_key(make: MakeIdentifier, store: FakeStore) -> None:
    key, row = store.add(user=None)
    result = await make().identify(scope([(b"x-api-key", key.encode())]))
    assert result == Identity("org-1", None, "api_key", row.id)


async def test_api_keys_disabled_ignores_x_api_key(make: MakeIdentifier, store: FakeStore) -> None:
    key, _ = store.add()
    result = await make(api_keys=False).identify(scope([(b"x-api-key", key.encode())]))
    assert isinstance(result, IdentityFailure) and result.status == 401
    assert store.lookups == 0


async def test_scope_state_names_org_and_user(make: MakeIdentifier) -> None:
    state = {"creditgate_org": "org-s", "creditgate_user": "u-s"}
    assert await make().identify(scope(state=state)) == Identity("org-s", "u-s", "scope")
    assert await make().identify(scope(state={"creditgate_org": "o"})) == Identity(
        "o", None, "scope"
    )


@pytest.mark.parametrize(
    "state",
    [
        {"creditgate_org": ""},
        {"creditgate_org": "has space"},
        {"creditgate_org": 42},
        {"creditgate_org": "o", "creditgate_user": "x" * 201},
        {"creditgate_org": "o", "creditgate_user": "caf\u00e9"},
    ],
)
async def test_scope_state_with_invalid_ids_is_401(
    make: MakeIdentifier, state: dict[str, Any]
) -> None:
    result = await make().identify(scope(state=state))
    assert isinstance(result, IdentityFailure) and result.status == 401


async def test_trusted_headers_only_when_enabled(make: MakeIdentifier) -> None:
    headers = [(b"x-org-id", b"org-h"), (b"x-user-id", b"u-h")]
    off = await make().identify(scope(headers))
    assert isinstance(off, IdentityFailure) and off.status == 401
    on = await make(trusted_headers=True).identify(scope(headers))
    assert on == Identity("org-h", "u-h", "header")


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-org-id", b"org with space")],
        [(b"x-org-id", b"")],
        [(b"x-org-id", b"o" * 201)],
        [(b"x-org-id", b"caf\xc3\xa9")],
        [(b"x-org-id", b"tab\there")],
        [(b"x-org-id", b"ok"), (b"x-user-id", b"\x00")],
        [(b"x-user-id", b"u-without-org")],
    ],
)
async def test_trusted_headers_with_invalid_ids_are_401(
    make: MakeIdentifier, headers: list[tuple[bytes, bytes]]
) -> None:
    result = await make(trusted_headers=True).identify(scope(headers))
    assert isinstance(result, IdentityFailure) and result.status == 401


async def test_id_of_200_printable_chars_is_accepted(make: MakeIdentifier) -> None:
    org = "!~" * 100
    result = await make(trusted_headers=True).identify(scope([(b"x-org-id", org.encode())]))
    assert result == Identity(org, None, "header")


async def test_no_credentials_is_401_naming_what_is_accepted(make: MakeIdentifier) -> None:
    result = await make().identify(scope())
    assert isinstance(result, IdentityFailure) and result.status == 401
    assert "no credentials" in result.detail and "X-API-Key" in result.detail


# --- precedence -------------------------------------------------------------------------------


async def test_scope_state_beats_api_key(make: MakeIdentifier, store: FakeStore) -> None:
    key, _ = store.add(org="from-key")
    result = await make().identify(scope(bearer(key), state={"creditgate_org": "from-app"}))
    assert isinstance(result, Identity) and result.org == "from-app" and result.via == "scope"
    assert store.lookups == 0


async def test_api_key_beats_trusted_headers(make: MakeIdentifier, store: FakeStore) -> None:
    key, _ = store.add(org="from-key")
    result = await make(trusted_headers=True).identify(
        scope([*bearer(key), (b"x-org-id", b"from-header")])
    )
    assert isinstance(result, Identity) and result.org == "from-key"


async def test_bad_api_key_does_not_fall_through_to_headers(make: MakeIdentifier) -> None:
    result = await make(trusted_headers=True).identify(
        scope([*bearer(generate_api_key()), (b"x-org-id", b"from-header")])
    )
    assert isinstance(result, IdentityFailure) and result.status == 401


async def test_foreign_authorization_falls_through_to_headers(make: MakeIdentifier) -> None:
    # A Basic credential or an opaque bearer token may be meant for the upstream app.
    ident = make(trusted_headers=True)
    for auth in (b"Basic dXNlcjpwdw==", b"Bearer opaque-upstream-token"):
        result = await ident.identify(scope([(b"authorization", auth), (b"x-org-id", b"o")]))
        assert result == Identity("o", None, "header")


# --- malformed input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"Bearer",
        b"Bearer ",
        b"Bearer    ",
        b"Bearer cg_",
        b"Bearer cg_short",
        b"Bearer cg_" + b"A" * 42 + b"+",
        b"Bearer cg_" + b"\xff" * 43,
        b"Bearer \xff\xfe\x00",
        b"Bearer " + b"cg_" + b"A" * 20000,
        b"\xc3\xa9\xc3\xa9 token",
        b"Basic",
        b"Bearer a.b.c",
    ],
)
async def test_malformed_authorization_is_401_not_an_exception(
    make: MakeIdentifier, store: FakeStore, value: bytes
) -> None:
    result = await make().identify(scope([(b"authorization", value)]))
    assert isinstance(result, IdentityFailure) and result.status == 401
    assert store.lookups == 0


@pytest.mark.parametrize(
    "value", [b"", b"nope", b"cg_" + b"\x80" * 43, generate_api_key().encode()]
)
async def test_bad_x_api_key_is_401(make: MakeIdentifier, value: bytes) -> None:
    result = await make().identify(scope([(b"x-api-key", value)]))
    assert isinstance(result, IdentityFailure) and result.status == 401


@pytest.mark.parametrize("name", [b"authorization", b"x-api-key", b"x-org-id", b"x-user-id"])
async def test_repeated_identity_header_is_401(
    make: MakeIdentifier, store: FakeStore, name: bytes
) -> None:
    key, _ = store.add()
    value = b"Bearer " + key.encode() if name == b"authorization" else key.encode()
    result = await make(trusted_headers=True).identify(scope([(name, value), (name, value)]))
    assert isinstance(result, IdentityFailure) and result.status == 401
    assert "more than one" in result.detail


# Names that are not identity headers, next to ones that are (the header loop skips
# every name outside its set first; these must neither count nor shadow the real ones).
_OTHER_HEADERS = [
    (b"host", b"gw"),
    (b"x-api-keys", b"cg_not_this"),
    (b"authorization2", b"Bearer cg_not_this"),
    (b"content-type", b"application/json"),
]


async def test_identity_headers_found_among_other_headers(
    make: MakeIdentifier, store: FakeStore
) -> None:
    key, row = store.add()
    headers = [*_OTHER_HEADERS[:2], (b"authorization", b"Bearer " + key.encode())]
    identifier = make()
    result = await identifier.identify(scope([*headers, *_OTHER_HEADERS[2:]]))
    assert result == Identity("org-1", "user-1", "api_key", row.id)
    # The cached answer (identify_nowait's fast path) is the same identity.
    assert identifier.identify_nowait(scope([*headers, *_OTHER_HEADERS[2:]])) == result
    trusted = await make(trusted_headers=True).identify(
        scope([*_OTHER_HEADERS, (b"x-org-id", b"org-9"), (b"x-user-id", b"u9")])
    )
    assert trusted == Identity("org-9", "u9", "header")


async def test_repeated_identity_header_among_other_headers_is_401(
    make: MakeIdentifier, store: FakeStore
) -> None:
    key, _ = store.add()
    value = b"Bearer " + key.encode()
    headers = [(b"authorization", value), *_OTHER_HEADERS, (b"authorization", value)]
    result = await make().identify(scope(headers))
    assert isinstance(result, IdentityFailure) and "more than one" in result.detail


async def test_the_same_header_names_read_each_requests_own_values(
    make: MakeIdentifier, store: FakeStore
) -> None:
    """Requests with the same header names, one after another, are each decided by their
    own values: two keys under the same names are two callers, a repeated header is
    refused every time, and other names (X-API-Key, trusted headers) decide as theirs."""
    identifier = make(trusted_headers=True)
    key_a, row_a = store.add("org-a", "u-a")
    key_b, row_b = store.add("org-b", "u-b")
    names = [(b"user-agent", b"sdk"), (b"authorization", b"")]
    for _ in range(2):  # the second round: every identity cached
        for key, row in ((key_a, row_a), (key_b, row_b)):
            headers = [names[0], (b"authorization", b"Bearer " + key.encode())]
            assert await identifier.identify(scope(headers)) == Identity(
                row.org, row.user, "api_key", row.id
            )
            by_api_key = [(b"x-api-key", key.encode()), names[0]]
            assert await identifier.identify(scope(by_api_key)) == Identity(
                row.org, row.user, "api_key", row.id
            )
        repeated = [(b"authorization", b"Bearer x"), *names[:1], (b"x-org-id", b"o")] * 2
        result = identifier.decide(scope(repeated))
        assert isinstance(result, IdentityFailure) and "more than one" in result.detail
        trusted = [names[0], (b"x-user-id", b"u9"), (b"x-org-id", b"org-9")]
        assert await identifier.identify(scope(trusted)) == Identity("org-9", "u9", "header")
        assert await identifier.identify(scope([names[0]])) == IdentityFailure(
            401, identifier._missing_detail(None, None)
        )


async def test_scope_without_client_or_headers(make: MakeIdentifier) -> None:
    result = await make().identify({"type": "http", "client": None, "headers": []})
    assert isinstance(result, IdentityFailure) and result.status == 401


# --- bad credentials throttling ---------------------------------------------------------------


async def test_bad_credentials_beyond_the_limit_get_429_without_lookups(
    make: MakeIdentifier, store: FakeStore, clock: Clock
) -> None:
    good, _ = store.add()
    other_good, _ = store.add(org="org-2")
    ident = make(bad_credentials_per_minute=5)
    attacker = ("203.0.113.9", 1)
    assert isinstance(await ident.identify(scope(bearer(good), client=attacker)), Identity)
    for _ in range(5):
        result = await ident.identify(scope(bearer(generate_api_key()), client=attacker))
        assert isinstance(result, IdentityFailure) and result.status == 401
    lookups = store.lookups
    for probe in (generate_api_key(), "cg_malformed", other_good):
        result = await ident.identify(scope(bearer(probe), client=attacker))
        assert isinstance(result, IdentityFailure) and result.status == 429
        assert result.retry_after is not None and 1 <= result.retry_after <= 12
    assert store.lookups == lookups
    # A key this process already knows is good still works (NAT neighbours).
    assert isinstance(await ident.identify(scope(bearer(good), client=attacker)), Identity)
    # Other addresses are unaffected.
    result = await ident.identify(scope(bearer(other_good), client=("198.51.100.1", 2)))
    assert isinstance(result, Identity)
    # One attempt per 12 s drains back in.
    clock.advance(12.01)
    result = await ident.identify(scope(bearer(generate_api_key()), client=attacker))
    assert isinstance(result, IdentityFailure) and result.status == 401
    result = await ident.identify(scope(bearer(generate_api_key()), client=attacker))
    assert isinstance(result, IdentityFailure) and result.status == 429


async def test_forwarded_for_does_not_escape_the_limit(make: MakeIdentifier) -> None:
    ident = make(bad_credentials_per_minute=2)
    statuses = []
    for i in range(4):
        headers = [*bearer(generate_api_key()), (b"x-forwarded-for", f"10.9.9.{i}".encode())]
        result = await ident.identify(scope(headers, client=("192.0.2.1", i)))
        assert isinstance(result, IdentityFailure)
        statuses.append(result.status)
    assert statuses == [401, 401, 429, 429]


def test_limiter_groups_ipv6_by_64_and_is_bounded() -> None:
    def client(host: str) -> str:
        return client_address({"client": (host, 1)})

    assert client("2001:db8:1:2:aaaa::1") == client("2001:db8:1:2:bbbb::2")
    assert client("2001:db8:1:2::1") != client("2001:db8:1:3::1")
    assert client("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_address({"client": None}) == "-"

    clock = Clock()
    limiter = BadCredentialLimiter(1, clock=clock, max_addresses=100)
    for i in range(1000):
        limiter.record(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    assert limiter.retry_after("10.0.3.231") is not None  # the newest are kept
    assert limiter.retry_after("10.0.0.0") is None


def test_ttl_cache_expiry_and_eviction() -> None:
    cache: TtlCache[str, int] = TtlCache(2)
    cache.put("a", 1, 10.0)
    cache.put("b", 2, 20.0)
    assert cache.get("a", 9.9) == 1 and cache.get("a", 10.0) is None
    cache.put("c", 3, 30.0)
    cache.put("d", 4, 30.0)
    assert "b" not in cache and cache.get("c", 0) == 3 and len(cache) == 2

"""The one header policy (gateway.core.headers), as a pure function of the request headers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.headers import OVERRIDE_HEADERS, HeaderPolicy, applied, canonical

H = list[tuple[bytes, bytes]]
KEY = b"cg_" + b"k" * 43


def names(headers: H | None) -> list[bytes]:
    assert headers is not None
    return [name for name, _ in headers]


def test_plain_requests_take_the_fast_path() -> None:
    """Nothing to remove: no copy is made (the caller uses the scope's list as it is)."""
    raw = [
        (b"host", b"h"), (b"accept", b"*/*"), (b"accept-encoding", b"gzip"),
        (b"content-type", b"application/json"), (b"user-agent", b"t"), (b"cookie", b"c=1"),
    ]  # fmt: skip
    cleaned, idem, duplicate = HeaderPolicy().clean(raw)
    assert (cleaned, idem, duplicate) == (None, None, False)


@pytest.mark.parametrize(
    "name",
    [
        b"x-creditgate-org", b"X-Creditgate-Org", b"X-CREDITGATE-FEATURE", b"x_creditgate_org",
        b"X_Creditgate_User", b"x-creditgate_request-id", b"x-creditgate-anything",
    ],
)  # fmt: skip
def test_creditgate_headers_are_stripped_in_any_spelling(name: bytes) -> None:
    cleaned, _, _ = HeaderPolicy(trusted_headers=True).clean([(b"host", b"h"), (name, b"victim")])
    assert names(cleaned) == [b"host"]


@pytest.mark.parametrize(
    "name",
    [
        b"x-http-method-override", b"X-HTTP-Method-Override", b"x_http_method_override",
        b"x-method-override", b"x-http-method", b"x-original-url", b"X-Rewrite-URL",
        b"x_original_url",
    ],
)  # fmt: skip
def test_method_and_path_override_headers_are_stripped(name: bytes) -> None:
    cleaned, _, _ = HeaderPolicy().clean([(name, b"POST"), (b"accept", b"*/*")])
    assert names(cleaned) == [b"accept"]


def test_override_list_covers_what_the_proxy_dropped() -> None:
    assert {
        b"x-http-method-override", b"x-http-method", b"x-method-override", b"x-original-url",
        b"x-rewrite-url",
    } <= OVERRIDE_HEADERS  # fmt: skip


@pytest.mark.parametrize("name", [b"x-org-id", b"X-User-Id", b"x_org_id", b"X_USER_ID"])
def test_identity_headers_stripped_unless_trusted(name: bytes) -> None:
    raw = [(name, b"victim"), (b"accept", b"*/*")]
    assert names(HeaderPolicy(trusted_headers=False).clean(raw)[0]) == [b"accept"]
    kept = HeaderPolicy(trusted_headers=True).clean(raw)[0]
    assert kept is None or names(kept) == [name, b"accept"]


@pytest.mark.parametrize(
    ("header", "dropped"),
    [
        ((b"authorization", b"Bearer " + KEY), True),
        ((b"Authorization", b"bearer  " + KEY + b" "), True),
        ((b"authorization", b"BEARER " + KEY), True),
        ((b"x-api-key", KEY), True),
        ((b"X-Api-Key", b" " + KEY), True),
        ((b"x_api_key", KEY), True),
        ((b"authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig"), False),  # the app's JWT
        ((b"authorization", b"Basic dXNlcjpwYXNz"), False),
        ((b"x-api-key", b"sk_live_app_key"), False),  # the app's own key
    ],
)
def test_creditgate_credentials_stripped_by_default(
    header: tuple[bytes, bytes], dropped: bool
) -> None:
    raw = [header, (b"accept", b"*/*")]
    cleaned = HeaderPolicy().clean(raw)[0]
    assert names(raw if cleaned is None else cleaned) == (
        [b"accept"] if dropped else [header[0], b"accept"]
    )
    kept = HeaderPolicy(forward_credentials=True).clean(raw)[0]
    assert kept is None or names(kept) == [header[0], b"accept"]


def test_idempotency_key_is_read_and_kept() -> None:
    raw = [(b"idempotency-key", b"order-42"), (b"accept", b"*/*")]
    cleaned, idem, duplicate = HeaderPolicy().clean(raw)
    assert (cleaned, idem, duplicate) == (None, "order-42", False)  # nothing removed
    assert HeaderPolicy().clean([(b"idempotency-key", b"")])[1] is None  # empty: no key


@pytest.mark.parametrize(
    "second", [(b"idempotency-key", b"b"), (b"Idempotency-Key", b"b"), (b"idempotency-key", b"")]
)
def test_two_idempotency_keys_are_reported(second: tuple[bytes, bytes]) -> None:
    _, _, duplicate = HeaderPolicy().clean([(b"idempotency-key", b"a"), second])
    assert duplicate


def test_underscore_idempotency_key_never_reaches_the_app() -> None:
    """The gateway reads only the dash spelling; a server merging spellings must not see
    another key than the one charged."""
    cleaned, idem, duplicate = HeaderPolicy().clean([(b"idempotency_key", b"x"), (b"a", b"1")])
    assert (names(cleaned), idem, duplicate) == ([b"a"], None, False)


def test_order_and_other_headers_are_preserved() -> None:
    raw = [
        (b"accept", b"1"), (b"x-trace", b"2"), (b"x-creditgate-org", b"v"), (b"if-match", b"3"),
        (b"authorization", b"Bearer jwt.x.y"), (b"cookie", b"4"), (b"x-forwarded-for", b"5"),
    ]  # fmt: skip
    cleaned, _, _ = HeaderPolicy().clean(raw)
    assert cleaned == [h for h in raw if h[0] != b"x-creditgate-org"]


def test_two_authorization_headers_lose_every_creditgate_key() -> None:
    key = (b"authorization", b"Bearer " + KEY)
    for raw in ([key, (b"authorization", b"Bearer jwt")], [(b"authorization", b"Bearer j"), key],
                [key, (b"accept", b"*/*"), key]):  # fmt: skip
        cleaned = HeaderPolicy().clean(raw)[0]
        assert cleaned == [h for h in raw if h != key]


def test_an_empty_header_name_does_not_break_the_scan() -> None:
    cleaned, _, _ = HeaderPolicy().clean([(b"", b"x"), (b"x-creditgate-org", b"v")])
    assert cleaned == [(b"", b"x")]


def test_canonical() -> None:
    assert canonical(b"X_Creditgate-Org") == b"x-creditgate-org"


def test_common_harmless_headers_take_the_fast_path() -> None:
    raw = [
        (b"x-forwarded-for", b"1.2.3.4"), (b"x-request-id", b"r"), (b"if-none-match", b"e"),
        (b"accept-ranges", b"x"),  # as long as "authorization": still harmless
        (b"authorization", b"Bearer eyJ.jwt.sig"), (b"idempotency-key", b"k"),
    ]  # fmt: skip
    cleaned, idem, duplicate = HeaderPolicy().clean(raw)
    assert (cleaned, idem, duplicate) == (None, "k", False)


_NAMES = [
    "x-creditgate-org", "x-http-method-override", "x-original-url", "x-org-id", "x-user-id",
    "x-api-key", "authorization", "idempotency-key", "accept", "accept-ranges",
    "x-forwarded-for", "if-none-match", "host", "i", "x", "a", "",
]  # fmt: skip
_VALUES = [b"Bearer " + KEY, KEY, b"Bearer jwt", b"v", b""]


@st.composite
def _header(draw: st.DrawFn) -> tuple[bytes, bytes]:
    name = draw(st.sampled_from(_NAMES))
    if draw(st.booleans()):
        name = name.replace("-", "_")
    if draw(st.booleans()):  # some letters upper case
        flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
        name = "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))
    return name.encode(), draw(st.sampled_from(_VALUES))


@given(
    st.lists(_header(), max_size=8),
    st.booleans(),
    st.booleans(),
)
def test_the_first_pass_agrees_with_the_full_pass(
    raw: list[tuple[bytes, bytes]], trusted: bool, forward: bool
) -> None:
    """Whatever the first pass decides alone is what the full pass would have decided."""
    policy = HeaderPolicy(trusted_headers=trusted, forward_credentials=forward)
    cleaned, idem, duplicate = policy.clean(raw)
    full = policy._filter(raw)
    assert (raw if cleaned is None else cleaned, idem, duplicate) == full


# One policy per setting for every example: its plans, learnt from earlier examples' names,
# are applied to later examples with the same names and other values.
_SHARED = {
    (t, f): HeaderPolicy(trusted_headers=t, forward_credentials=f) for t in (0, 1) for f in (0, 1)
}


@given(st.lists(_header(), max_size=8), st.booleans(), st.booleans())
def test_a_plan_learnt_from_other_values_agrees_with_the_full_pass(
    raw: list[tuple[bytes, bytes]], trusted: bool, forward: bool
) -> None:
    policy = _SHARED[(trusted, forward)]
    for values in (
        raw,
        [(n, v) for (n, _), v in zip(raw, reversed([v for _, v in raw]), strict=True)],
    ):
        cleaned, idem, duplicate = policy.clean(values)
        assert (values if cleaned is None else cleaned, idem, duplicate) == policy._filter(values)


def test_the_same_names_with_another_credential_are_decided_by_the_value() -> None:
    policy = HeaderPolicy()
    jwt = [(b"host", b"h"), (b"authorization", b"Bearer eyJ.jwt"), (b"idempotency-key", b"k1")]
    ours = [(b"host", b"h"), (b"authorization", b"Bearer " + KEY), (b"idempotency-key", b"k2")]
    assert policy.clean(jwt) == (None, "k1", False)
    assert policy.clean(ours) == ([(b"host", b"h"), (b"idempotency-key", b"k2")], "k2", False)
    assert policy.clean(jwt) == (None, "k1", False)


def test_plans_are_bounded_and_unhashable_names_take_the_full_pass() -> None:
    policy = HeaderPolicy()
    for n in range(1000):
        policy.clean([(b"h%d" % n, b"v")])
    assert len(policy._plans) <= 256
    policy._plans.clear()
    long = [(b"h" * 5000, b"v")]
    assert policy.clean(long) == (None, None, False)
    assert policy.clean([(b"h%d" % n, b"v") for n in range(65)]) == (None, None, False)
    assert policy._plans == {}  # planned, not kept
    raw: list[Any] = [(bytearray(b"x-creditgate-org"), b"v"), (b"host", b"h")]
    assert policy.clean(raw) == ([(b"host", b"h")], None, False)


def test_inspect_decides_without_a_copy_and_applied_builds_it() -> None:
    """``inspect`` gives the verdict (the credential's index) without building the cleaned
    list; ``applied`` builds what ``clean`` returns, the request's own list unchanged."""
    policy = HeaderPolicy()
    ours = [(b"host", b"h"), (b"authorization", b"Bearer " + KEY), (b"idempotency-key", b"k")]
    plain = [(b"host", b"h"), (b"accept", b"*/*")]
    spoofed = [(b"host", b"h"), (b"X-Creditgate-Org", b"victim")]
    assert policy.inspect(ours) == (1, "k", False)
    assert policy.inspect(plain) == (-1, None, False)
    for raw in (ours, plain, spoofed):
        before = list(raw)
        removal, idem, duplicate = policy.inspect(raw)
        assert (applied(raw, removal), idem, duplicate) == policy.clean(raw)
        assert raw == before
    assert applied(ours, 1) == [(b"host", b"h"), (b"idempotency-key", b"k")]
    assert applied(spoofed, policy.inspect(spoofed)[0]) == [(b"host", b"h")]

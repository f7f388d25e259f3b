"""A complete answer priced and told in one compiled call (gateway/usage/_topscan.c
``priced``) against its Python form (gateway/metering/usage_tap.py ``priced_counts`` over
``counts``): the same tokens, settle value, X-Tokens-* header values and counts, for every
price table, cap and balance, or "don't know" only where the Python form must decide."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.metering.settlement import counts_value
from gateway.metering.usage_tap import _plain_answer, priced_counts
from gateway.usage.prices import Price, PriceTable
from gateway.usage.topscan import counts, priced
from tests.usage import wire
from tests.usage.test_topscan import COUNT_EDGES, MUTATIONS, mutate, usual_answers

needs_compiled = pytest.mark.skipif(priced is None, reason="gateway.usage._topscan not built")

PRICES = st.one_of(
    st.fractions(min_value=0, max_value=1000, max_denominator=10**6),
    st.sampled_from(
        [Fraction(0), Fraction(3, 10), Fraction(1, 3), Fraction(10**15), Fraction(1, 10**19)]
    ),
)
TABLES = st.builds(
    lambda a, b, c, d, e, f: PriceTable(
        [("gpt-4o*", Price(a, b, c)), ("claude-*", Price(d, d, e))], Price(f, f, f)
    ),
    PRICES, PRICES, PRICES, PRICES, PRICES, PRICES,
)  # fmt: skip
MAXIMA = st.one_of(
    st.none(), st.integers(0, 10**6), st.sampled_from([0, 1, 10**15, 2**63 - 1, 2**63, 10**30])
)
LEFTS = st.one_of(
    st.none(), st.integers(-(10**6), 10**9), st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**70])
)


def _compare(body: bytes, table: PriceTable, maximum: int | None, left: int | None) -> None:
    assert priced is not None and counts is not None
    for mode in range(4):
        got = priced(body, mode, table.terms_memo(), table.terms_for, maximum, left, None)
        read = counts(body, mode)
        if read is None:
            assert got is None
            continue
        want = priced_counts(read, table, maximum, left)
        if got is None:
            # Only outside the 128-bit computation: a term, the cap, the balance or the
            # charge past its bounds.
            terms = table.terms_for(read[1])
            assert (
                max(terms) >= 2**62
                or (maximum is not None and maximum >= 2**63)
                or (left is not None and not -(2**63) <= left < 2**63)
                or want[0] > 10**18
            )
            continue
        assert got == want
        assert [type(v) for v in got] == [type(v) for v in want]
        assert type(got[1][0]) is str and got[1][0].isascii()
        tokens, _, _, _, _, model, ui, uc, uo, ur = got
        assert got[1] == (counts_value(tokens, model, ui, uc, uo, ur),)


@needs_compiled
@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    body=usual_answers(),
    mutations=st.lists(MUTATIONS, max_size=1),
    table=TABLES,
    maximum=MAXIMA,
    left=LEFTS,
)
def test_generated_answers_are_priced_alike(
    body: bytes,
    mutations: list[tuple[str, int, bytes]],
    table: PriceTable,
    maximum: int | None,
    left: int | None,
) -> None:
    for how in mutations:
        body = mutate(body, how)
    _compare(body, table, maximum, left)


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(table=TABLES, maximum=MAXIMA, left=LEFTS)
def test_hand_written_answers_are_priced_alike(
    table: PriceTable, maximum: int | None, left: int | None
) -> None:
    bodies = [
        *COUNT_EDGES,
        wire.OPENAI_CHAT_JSON,
        wire.OPENAI_RESPONSES_JSON,
        wire.ANTHROPIC_JSON,
        wire.GEMINI_JSON,
    ]
    for body in bodies:
        _compare(body, table, maximum, left)


@needs_compiled
def test_rounding_up_the_cap_and_the_balance() -> None:
    """The exact sum rounded up once, the cap, what is left never below zero, a model no
    glob names priced at the default, and the terms remembered for the next call."""
    assert priced is not None
    table = PriceTable([("gpt-4o*", Price.of(1, 4, 0.5))], Price.of(2, 8))
    body = (
        b'{"object":"chat.completion","model":"gpt-4o-mini","usage":{"prompt_tokens":1001,'
        b'"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":1},'
        b'"completion_tokens_details":{"reasoning_tokens":1}}}'
    )
    # (1000 x 1 + 1 x 0.5 + 3 x 4) / 1000 = 1.0125: 2 tokens, rounded up.
    assert table.terms_memo() == {}
    got = priced(body, 1, table.terms_memo(), table.terms_for, None, 10, None)
    assert got == (
        2, ("2 usage  1000 1 2 1 gpt-4o-mini",), b"2", b"8", "openai", "gpt-4o-mini", 1000, 1, 2, 1
    )  # fmt: skip
    assert "gpt-4o-mini" in table.terms_memo()
    assert priced(body, 1, table.terms_memo(), table.terms_for, 1, 1, None) == (
        1, ("1 usage  1000 1 2 1 gpt-4o-mini",), b"1", b"0", "openai", "gpt-4o-mini", 1000, 1, 2, 1
    )  # fmt: skip
    assert priced(body, 0, table.terms_memo(), table.terms_for, 0, None, None)[:4] == (  # type: ignore[index]
        0, ("0 usage  1000 1 2 1 gpt-4o-mini",), b"0", None
    )  # fmt: skip
    other = body.replace(b"gpt-4o-mini", b"o3")  # the default: (1000 x 2 + 2 + 3 x 8) / 1000
    assert priced(other, 0, table.terms_memo(), table.terms_for, None, -5, None)[:4] == (  # type: ignore[index]
        3, ("3 usage  1000 1 2 1 o3",), b"3", b"0"
    )  # fmt: skip
    none = body.replace(b'"model":"gpt-4o-mini",', b"")
    assert priced(none, 1, table.terms_memo(), table.terms_for, None, None, None) == (
        3, ("3 usage  1000 1 2 1 ",), b"3", None, "openai", None, 1000, 1, 2, 1
    )  # fmt: skip
    with pytest.raises(TypeError):
        priced(body, 1, [], table.terms_for, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        priced(body, 4, {}, table.terms_for, None, None, None)


HEADER_NAMES = st.sampled_from(
    [b"content-type", b"content-encoding", b"content-length", b"Content-Type", b"x-a"]
)
HEADER_VALUES = st.sampled_from(
    [
        b"", b"identity", b" Identity ", b"IDENTITY", b"gzip", b"br", b"application/json",
        b"text/event-stream", b"TEXT/Event-Stream; charset=utf-8", b"text/event-strea",
        b"text/plain",
    ]
)  # fmt: skip


@needs_compiled
@settings(max_examples=1000, deadline=None)
@given(head=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5))
def test_the_headers_test_says_plain_only_where_the_taps_does(
    head: list[tuple[bytes, bytes]],
) -> None:
    """``priced``'s test of an answer's headers (False: left to the tap's) never calls an
    answer plain that ResponseTap's own test would not, and calls the usual ones plain."""
    assert priced is not None
    table = PriceTable([], Price.of(1, 1))
    got = priced(wire.OPENAI_CHAT_JSON, 0, table.terms_memo(), table.terms_for, None, None, head)
    plain = _plain_answer(head)
    if got is not False:
        assert plain and got == priced(
            wire.OPENAI_CHAT_JSON, 0, table.terms_memo(), table.terms_for, None, None, None
        )
    kinds = [v for n, v in head if n == b"content-type"]
    encodings = [v for n, v in head if n == b"content-encoding"]
    if plain and (not encodings or encodings[-1] in (b"", b"identity")):
        assert got is not False  # the usual plain answer is told by the compiled test
    if kinds and kinds[-1].lower().startswith(b"text/event-stream"):
        assert got is False


@needs_compiled
def test_headers_of_an_unusual_form_are_left_to_the_tap() -> None:
    assert priced is not None
    table = PriceTable([], Price.of(1, 1))
    body = wire.OPENAI_CHAT_JSON
    for head in (
        [(b"content-type", "application/json")],
        [[b"content-type", b"application/json"]],
        [(b"content-type",)],
        ((b"content-type", b"application/json"),),
    ):
        got = priced(body, 0, table.terms_memo(), table.terms_for, None, None, head)  # type: ignore[arg-type]
        assert got is False
    # A body it does not know under plain headers: None, the reading left to Python.
    assert priced(b"{}", 0, table.terms_memo(), table.terms_for, None, None, []) is None

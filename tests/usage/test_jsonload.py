"""The fast JSON decode of usage answers (gateway/usage/jsonload.py) against the plain
``json.loads`` decode it replaced: the same usage, or the same ``None``, on every body,
however hostile. The orjson path runs only where orjson is installed (a dependency of the
package); the standard-library path is the reference itself."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.usage import InvalidUsageError, Usage, jsonload, usage_from_document, usage_from_json

from . import wire

# Every test once with the compiled top-level scan and once without (tests/usage/conftest.py).
pytestmark = pytest.mark.usefixtures("usage_form")

PROVIDERS = ("auto", "openai", "anthropic", "gemini")

needs_orjson = pytest.mark.skipif(not jsonload.HAS_ORJSON, reason="orjson not installed")


def reference(body: bytes, provider: str) -> Usage | None:
    """usage_from_json as it was before the fast decode: json.loads, then the document."""
    if b"usage" not in body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    try:
        return usage_from_document(doc, provider)
    except InvalidUsageError:
        return None


def outcome(fn: Callable[[], object]) -> object:
    """What ``fn`` returns, or the kind of error it raises (RecursionError apart)."""
    try:
        return fn()
    except RecursionError:
        return "RecursionError"
    except ValueError:
        return "ValueError"


def assert_same(body: bytes) -> None:
    for provider in PROVIDERS:
        assert usage_from_json(body, provider) == reference(body, provider), (provider, body)


CHAT = wire.OPENAI_CHAT_JSON
HOSTILE = [
    # the word inside strings, escaped quotes, nested usage keys
    b'{"object":"chat.completion","model":"m","choices":[{"message":{"content":'
    b'"\\"usage\\": {\\"prompt_tokens\\": 999}"}}],"usage":{"prompt_tokens":1}}',
    b'{"object":"chat.completion","choices":[{"usage":{"prompt_tokens":999}}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":2}}',
    b'{"object":"chat.completion","usage":{"usage":{"prompt_tokens":9}},"x":"usage"}',
    b'{"object":"chat.completion","x":"\\\\","usage":{"prompt_tokens":3}}',
    # duplicated keys: the last wins, whatever it is
    b'{"object":"chat.completion","usage":{"prompt_tokens":1},"usage":{"prompt_tokens":7}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":1},"usage":null}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":1},"usage":5}',
    b'{"usageMetadata":{"promptTokenCount":1},"usageMetadata":{"promptTokenCount":4}}',
    b'{"model":"a","model":"b","type":"message","usage":{"input_tokens":1}}',
    # whitespace variants and key spellings with escapes
    b' \n\t{ "object" : "chat.completion" ,\r\n "usage" :\t{ "prompt_tokens" : 4 } } \n',
    b'{"object":"chat.completion","\\u0075sage":{"prompt_tokens":4}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":4}}\x0c',
    b'{"object":"chat.completion","usage":{"prompt_tokens":4}} x',
    # non-object usage, huge, negative, fractional, non-numeric counts
    b'{"object":"chat.completion","usage":[1,2]}',
    b'{"object":"chat.completion","usage":"usage"}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":18446744073709551616}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":18446744073709551615}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":123456789012345678901234567890}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":-9223372036854775809}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":-1}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":1000000000000}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":1000000000001}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":4.0}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":1e400}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":NaN}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":Infinity,"completion_tokens":1}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":true}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":01}}',
    # what orjson refuses and the standard library accepts: surrogates, BOM, UTF-16
    b'{"object":"chat.completion","model":"\\ud800","usage":{"prompt_tokens":4}}',
    b'{"object":"chat.completion","model":"\xed\xa0\x80","usage":{"prompt_tokens":4}}',
    b'\xef\xbb\xbf{"object":"chat.completion","usage":{"prompt_tokens":4}}',
    '{"object":"chat.completion","usage":{"prompt_tokens":4}}'.encode("utf-16"),
    '{"object":"chat.completion","usage":{"prompt_tokens":4}}'.encode("utf-16-le"),
    '{"object":"chat.completion","usage":{"prompt_tokens":4}}'.encode("utf-32"),
    # bad UTF-8, control characters, empty
    b'{"object":"chat.completion","model":"\xff","usage":{"prompt_tokens":4}}',
    b'{"object":"chat.completion","model":"a\x01","usage":{"prompt_tokens":4}}',
    b"usage",
    b"",
    # deep nesting around a real usage: where the two decoders' limits differ; short
    # bodies and long ones (the depth check differs: see jsonload._WALK_FROM)
    *(
        b'{"object":"chat.completion","pad":"' + b"p" * pad + b'","x":' + b"[" * depth
        + b"]" * depth + b',"usage":{"prompt_tokens":4}}'
        for depth in (200, 252, 253, 254, 255, 390, 401, 900, 990, 1000, 1023, 1024, 1100)
        for pad in (0, 20_000)
    ),
    b'{"object":"chat.completion","x":' + b'{"a":' * 1000 + b"1" + b"}" * 1000
    + b',"usage":{"prompt_tokens":4}}',
    # a Gemini array answer, and arrays with lies in them
    b'[{"usageMetadata":{"promptTokenCount":2}},{"usageMetadata":{"promptTokenCount":-2}}]',
    b'[{"usageMetadata":{"promptTokenCount":2}},{"usageMetadata":null},7]',
    # every provider's real answer
    CHAT,
    wire.OPENAI_RESPONSES_JSON,
    wire.ANTHROPIC_JSON,
    wire.GEMINI_JSON,
]  # fmt: skip


@pytest.mark.parametrize("body", HOSTILE)
def test_hostile_bodies_give_the_plain_decodes_answer(body: bytes) -> None:
    assert_same(body)


@pytest.mark.parametrize("real", [CHAT, wire.ANTHROPIC_JSON, wire.GEMINI_JSON])
def test_every_truncation_and_every_byte_flip_of_real_answers(real: bytes) -> None:
    for cut in range(len(real) + 1):
        assert_same(real[:cut])
    for at in range(len(real)):
        for byte in (b'"', b"\\", b"}", b"x"):
            assert_same(real[:at] + byte + real[at + 1 :])


def canon(value: object) -> object:
    """``value`` with integers outside 64 bits as orjson gives them (floats), and floats as
    their repr (so that NaN equals NaN)."""
    if isinstance(value, dict):
        return {k: canon(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canon(v) for v in value]
    if type(value) is int and not -(2**63) <= value < 2**64:
        value = float(value)
    return repr(value) if isinstance(value, float) else value


SHALLOW = [body for body in HOSTILE if body.count(b"[") + body.count(b"{") < 100]
DEEP = [body for body in HOSTILE if body.count(b"[") + body.count(b"{") >= 100]


@needs_orjson
@pytest.mark.parametrize("body", SHALLOW)
def test_the_orjson_document_is_the_standard_one(body: bytes) -> None:
    """Document for document, not only usage for usage: the same, except integers outside
    64 bits (floats from orjson; no count believes either)."""
    fast = outcome(lambda: jsonload.loads(body))
    plain = outcome(lambda: json.loads(body))
    assert canon(fast) == canon(plain)


@needs_orjson
@pytest.mark.parametrize("body", DEEP)
def test_deep_bodies_are_left_to_the_standard_library(body: bytes) -> None:
    """orjson would decode 1000 levels that json.loads refuses: such bodies never reach it."""
    fast = outcome(lambda: jsonload.loads(body))
    plain = outcome(lambda: json.loads(body))
    assert type(fast) is type(plain)
    if isinstance(fast, dict) and isinstance(plain, dict):
        assert fast["usage"] == plain["usage"]
    else:
        assert fast == plain == "RecursionError"


def test_without_orjson_the_standard_library_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.usage import responses

    monkeypatch.setattr(responses, "loads", jsonload.loads_exact)
    for body in HOSTILE:
        assert_same(body)


# -- random bodies -------------------------------------------------------------------------

KEYS = st.sampled_from(
    [
        "usage", "usageMetadata", "model", "modelVersion", "type", "object", "id",
        "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
        "cache_read_input_tokens", "cache_creation_input_tokens", "prompt_tokens_details",
        "cached_tokens", "completion_tokens_details", "reasoning_tokens", "total_tokens",
        "promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount",
        "cachedContentTokenCount", "choices", "content", "x",
    ]
)  # fmt: skip
STRINGS = st.one_of(
    st.sampled_from(
        [
            "chat.completion", "message", "response", "resp_1", "gpt-4o-mini", "claude-3",
            'say "usage": {"prompt_tokens": 9}', "\\", '\\"', "usage", "\ud800", "é",
        ]
    ),
    st.text(max_size=12),
)  # fmt: skip
NUMBERS = st.one_of(
    st.integers(min_value=-5, max_value=50),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**12, 10**12 + 1, 10**30, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS)


def _text(value: object, sep: str) -> str:
    """JSON text of ``value``, where a list of pairs is an object (keys may repeat)."""
    if isinstance(value, tuple):  # ("obj", pairs)
        return "{" + sep.join(
            json.dumps(k) + ":" + _text(v, sep) for k, v in value[1]
        ) + "}"  # fmt: skip
    if isinstance(value, list):
        return "[" + sep.join(_text(v, sep) for v in value) + "]"
    return json.dumps(value)  # NaN and Infinity as the standard library writes them


VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(st.just("obj"), st.lists(st.tuples(KEYS, inner), max_size=6)),
    ),
    max_leaves=25,
)
DOCS = st.one_of(
    st.tuples(st.just("obj"), st.lists(st.tuples(KEYS, VALUES), max_size=8)),
    st.lists(st.tuples(st.just("obj"), st.lists(st.tuples(KEYS, VALUES), max_size=4)), max_size=3),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=DOCS,
    sep=st.sampled_from([",", ", ", ",\n  ", " ,\t"]),
    cut=st.none() | st.integers(min_value=0, max_value=400),
    encoding=st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16"]),
)
def test_random_documents_give_the_plain_decodes_answer(
    doc: object, sep: str, cut: int | None, encoding: str
) -> None:
    text = _text(doc, sep)
    body = text.encode(encoding, "surrogatepass")
    if cut is not None:
        body = body[:cut]
    assert_same(body)


# -- request bodies (reserve: auto) ----------------------------------------------------------

REQUESTS = [
    b'{"model":"gpt-4o-mini","max_tokens":300,"n":2,"messages":[]}',
    b'{"model":"gpt-4o-mini","max_tokens":18446744073709551616,"n":2}',
    b'{"model":"gpt-4o-mini","max_tokens":300,"n":123456789012345678901234567890}',
    b'{"model":"\\ud800","max_tokens":300}',
    b'{"model":"m","max_tokens":NaN,"max_completion_tokens":7}',
    b'{"model":"m","max_tokens":1e400}',
    b'\xef\xbb\xbf{"model":"m","max_tokens":5}',
    b'{"model":"m","max_tokens":5,"max_tokens":9}',
    b'{"generationConfig":{"maxOutputTokens":18446744073709551616,"candidateCount":3}}',
    b'{"generationConfig":{"maxOutputTokens":64,"candidateCount":2}}',
    b'{"model":"m","stream":true,"x":' + b"[" * 1000 + b"]" * 1000 + b"}",
    b'{"model":"m","max_tokens":5',
    b"[]",
]


@pytest.mark.parametrize("body", REQUESTS)
def test_request_bodies_read_as_with_the_plain_decode(
    body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.usage import inspect_request, request_model
    from gateway.usage import requests as requests_module

    fast = [(inspect_request(body, p), request_model(body)) for p in PROVIDERS]
    monkeypatch.setattr(requests_module, "loads", jsonload.loads_exact)
    plain = [(inspect_request(body, p), request_model(body)) for p in PROVIDERS]
    assert fast == plain


@needs_orjson
@pytest.mark.parametrize(
    ("in_text", "depth", "walked", "plain"),
    [
        (0, 252, False, False),  # 254 opening brackets, the 2 objects included: not walked
        (1, 252, True, False),  # 255, one of them in a string: walked, not too deep
        (300, 2, True, False),  # many in the text: walked, not too deep
        (0, 253, True, False),  # 255: walked; 254 levels with the outer object: not too deep
        (0, 254, True, True),  # walked, 255 levels: the standard library decides
    ],
)
def test_long_bodies_count_their_brackets_before_a_walk(
    monkeypatch: pytest.MonkeyPatch, in_text: int, depth: int, walked: bool, plain: bool
) -> None:
    """Past jsonload._WALK_FROM bytes, a body with at most 254 opening brackets (``{`` and
    ``[``, in strings too) cannot nest deeper than 254 and is not walked; one with more is,
    and only a deep one goes to the standard library."""
    body = (
        b'{"object":"chat.completion","pad":"' + b"p" * 20_000 + b"[" * in_text + b'",'
        + b'"x":' + b"[" * depth + b"]" * depth + b',"usage":{"prompt_tokens":4}}'
    )  # fmt: skip
    assert len(body) >= jsonload._WALK_FROM
    walks: list[int] = []
    plains: list[int] = []
    real_walk, real_plain = jsonload._deeper_than, json.loads

    def walk(doc: object, limit: int) -> bool:
        walks.append(1)
        return real_walk(doc, limit)

    def plain_loads(raw: bytes) -> object:
        plains.append(1)
        return real_plain(raw)

    monkeypatch.setattr(jsonload, "_deeper_than", walk)
    monkeypatch.setattr(jsonload.json, "loads", plain_loads)
    doc = jsonload.loads(body)
    assert (bool(walks), bool(plains)) == (walked, plain)
    assert isinstance(doc, dict) and doc["usage"] == {"prompt_tokens": 4}

"""The compiled top-level scan (gateway/usage/_topscan.c) against ``json.loads``.

Its one duty: never vouch for a body that ``json.loads`` refuses or decodes differently,
and hand back exactly the last top-level occurrence of each wanted member. Checked directly
(``scan`` against ``json.loads``) and through ``usage_from_json`` (compiled form against the
pure-Python form) on generated documents, their mutations, and hand-written hostile bodies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.usage import Usage, responses, topscan, usage_from_json
from gateway.usage.topscan import counts, scan
from tests.support.needs import under_ci

from . import wire

PROVIDERS = ("auto", "openai", "anthropic", "gemini")
KEYS = responses._TOP_KEYS
needs_compiled = pytest.mark.skipif(scan is None, reason="gateway.usage._topscan not built")


def check_scan(body: bytes) -> bytes | None:
    """``scan(body)``, asserted to agree with ``json.loads`` whenever it vouches."""
    assert scan is not None
    members = scan(body, KEYS)
    if members is None:
        return None
    doc = json.loads(body)  # must not raise: the scan vouched for the body
    assert isinstance(doc, dict)
    wanted = {key.decode(): doc[key.decode()] for key in KEYS if key.decode() in doc}
    picked = json.loads(members)
    assert repr(picked) == repr(wanted)  # repr: -0.0 apart from 0, types apart (1 vs 1.0)
    return members


def both_forms(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """usage_from_json gives the same answer with the compiled reading and without it, the
    scan alone (the counts left to Python) too, and ``counts`` either does not know or
    gives that answer's fields."""
    assert counts is not None
    for provider in PROVIDERS:
        with monkeypatch.context() as patch:
            patch.setattr(responses, "_scan", None)
            patch.setattr(responses, "_counts", None)
            pure = usage_from_json(body, provider)
        with monkeypatch.context() as patch:
            patch.setattr(responses, "_scan", scan)
            patch.setattr(responses, "_counts", None)
            scanned = usage_from_json(body, provider)
        with monkeypatch.context() as patch:
            patch.setattr(responses, "_scan", scan)
            patch.setattr(responses, "_counts", counts)
            compiled = usage_from_json(body, provider)
        assert compiled == pure, (provider, body[:200])
        assert scanned == pure, (provider, body[:200])
        read = counts(body, responses.MODE_CODES[provider])
        if read is not None:
            assert pure is not None, (provider, body[:200])
            assert read == fields(pure), (provider, body[:200])
            assert type(read[1]) in (str, type(None))
            assert all(type(n) is int for n in read[2:])


def fields(usage: Usage) -> tuple[object, ...]:
    """A Usage as ``counts`` gives it."""
    return (
        usage.provider,
        usage.model,
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
    )


# -- which form is loaded ----------------------------------------------------------------------


def test_ci_tests_the_compiled_form() -> None:
    """CI installs with a compiler (.ci/run): the extension must be built and in use there,
    or CI would test only the fallback."""
    if not under_ci():
        pytest.skip("CI only: a local install may lack a compiler")
    assert topscan.COMPILED
    assert responses._scan is topscan.scan is not None  # type: ignore[attr-defined]


def _compiled_in_child(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != topscan.PURE_PYTHON_ENV}
    if env_value is not None:
        env[topscan.PURE_PYTHON_ENV] = env_value
    code = "from gateway.usage import responses, topscan; print(topscan.COMPILED, responses._scan)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_environment_switch_gives_the_pure_python_form(value: str) -> None:
    assert _compiled_in_child(value) == "False None"


@needs_compiled
@pytest.mark.parametrize("value", [None, "", "0"])
def test_without_the_switch_the_compiled_form_is_used(value: str | None) -> None:
    assert _compiled_in_child(value).startswith("True <built-in function scan>")


# -- prompt injection: the model's own "usage" keys are not the answer's ------------------------

HUGE = {"prompt_tokens": 999_999_999, "completion_tokens": 999_999_999, "total_tokens": 1}
REAL_OPENAI = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
JSON_MODE = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "usage": REAL_OPENAI,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": json.dumps({"usage": HUGE})},
            }
        ],
    }
).encode()
REAL_ANTHROPIC = {"input_tokens": 20, "output_tokens": 7}
TOOL_USE = json.dumps(
    {
        "id": "msg_1",
        "type": "message",
        "model": "claude-sonnet-4-20250514",
        "usage": REAL_ANTHROPIC,
        # after the real usage: a text search for the last "usage" would find these
        "content": [
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "report",
                "input": {"usage": {"input_tokens": 999_999_999, "output_tokens": 999_999_999}},
            },
            {"type": "text", "text": '"usage": {"input_tokens": 999999999}'},
        ],
    }
).encode()


@pytest.mark.usefixtures("usage_form")
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (JSON_MODE, Usage("openai", "gpt-4o-mini", 12, 0, 5, 0)),
        (TOOL_USE, Usage("anthropic", "claude-sonnet-4-20250514", 20, 0, 7, 0)),
    ],
)
def test_model_written_usage_keys_are_not_charged(body: bytes, expected: Usage) -> None:
    assert usage_from_json(body, "auto") == expected
    assert usage_from_json(body, expected.provider) == expected


# -- hand-written edges --------------------------------------------------------------------------


def _nest(levels: int) -> bytes:
    """A top-level object whose usage sits ``levels`` containers deep in all."""
    inner = b'{"prompt_tokens":1}'
    return (
        b'{"object":"chat.completion","x":'
        + b"[" * (levels - 1)
        + b"1"
        + b"]" * (levels - 1)
        + b',"usage":'
        + inner
        + b"}"
    )


NUMBER_TOKENS = [
    b"0", b"-0", b"01", b"-01", b"+1", b".5", b"1.", b"1.5", b"1e5", b"1E+5", b"1e-5", b"1e",
    b"1e+", b"-", b"--1", b"0x10", b"1.5e3", b"1_0", b"NaN", b"Infinity", b"-Infinity",
    b"1e400", b"-1e400", b"12 3", b"4.0", b"1" * 640, b"1" * 641, b"-" + b"1" * 640,
    b"-" + b"1" * 641, b"1" * 5000, b"1" * 5000 + b".0",
]  # fmt: skip
STRING_TOKENS = [
    b'\\"', b"\\\\", b"\\/", b"\\b\\f\\n\\r\\t", b"\\u00e9", b"\\u00E9", b"\\ud800",
    b"\\udc00\\ud800", b"\\ud83d\\ude00", b"\\u12", b"\\u12g4", b"\\x41", b"\\a", b"\\",
    b"\\'", b"\x00", b"\x1f", b"\t", b"\x7f", b"\xc3\xa9", b"\xc3", b"\xc0\xaf", b"\xc1\xbf",
    b"\xe0\x80\xaf", b"\xe0\xa0\x80", b"\xed\x9f\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
    b"\xef\xbf\xbf", b"\xf0\x8f\xbf\xbf", b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\x80", b"\xe2\x82", b"\xf0\x9f\x98",
    b"abcdefg\x01hijklmnop", b'abcdefgh"', b"x" * 100,
]  # fmt: skip

EDGES = [
    b"",
    b"{",
    b"{}",
    b" {} ",
    b"{}x",
    b'{"usage":{}}',
    b'{"usage":1,}',
    b'{,"usage":1}',
    b'{"usage" 1}',
    b'{"usage":}',
    b'{"usage":[1,]}',
    b'{"usage":[,1]}',
    b'{"usage":{"a":1,}}',
    b'{"usage":{"a"}}',
    b'{"usage":{1:2}}',
    b"{'usage':1}",
    b'{"usage":tru}',
    b'{"usage":nul}',
    b'{"usage":True}',
    b'{"usage":falsey}',
    b'["usage"]',
    b'"usage"',
    b'[{"usageMetadata":{"promptTokenCount":3},"modelVersion":"g"}]',
    # numbers
    *(b'{"object":"chat.completion","usage":{"prompt_tokens":' + n + b"}}" for n in NUMBER_TOKENS),
    # strings: escapes, control characters, UTF-8
    *(
        b'{"object":"chat.completion","model":"' + s + b'","usage":{"prompt_tokens":2}}'
        for s in STRING_TOKENS
    ),
    # top-level keys spelt with escapes, nested ones, and keys that are near misses
    b'{"object":"chat.completion","\\u0075sage":{"prompt_tokens":4}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":4},"us\\u0061ge":{"prompt_tokens":9}}',
    b'{"object":"chat.completion","usage":{"pr\\u006fmpt_tokens":4}}',
    b'{"object":"chat.completion","usag":{"prompt_tokens":4},"usage ":{"prompt_tokens":5}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":4},"Usage":{"prompt_tokens":5}}',
    # encodings and whitespace
    b'\xef\xbb\xbf{"object":"chat.completion","usage":{"prompt_tokens":4}}',
    '{"object":"chat.completion","usage":{"prompt_tokens":4}}'.encode("utf-16"),
    '{"object":"chat.completion","usage":{"prompt_tokens":4}}'.encode("utf-16-le"),
    '{"object":"chat.completion","usage":{"prompt_tokens":4}}'.encode("utf-32"),
    b'\x0c{"object":"chat.completion","usage":{"prompt_tokens":4}}',
    b'{"object":"chat.completion","usage":{"prompt_tokens":4}}\x0b',
    b'{"object":"chat.completion","usage":{"prompt_tokens":4}}\x00',
    b'{"object":"chat.completion",\xc2\xa0"usage":{"prompt_tokens":4}}',
    b' \t\r\n{ \t\r\n"object" \t\r\n: "chat.completion" , "usage" : { "prompt_tokens" : 4 } } ',
    # depth around the limit (254 levels, the top-level object included)
    *(_nest(levels) for levels in (3, 200, 253, 254, 255, 256, 1000, 5000)),
    b'{"usage":' + b"[" * 100_000,
    b'{"usage":' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}",
]


@needs_compiled
@pytest.mark.parametrize("body", EDGES)
def test_edges(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    check_scan(body)
    both_forms(body, monkeypatch)


@needs_compiled
@pytest.mark.parametrize(
    "body",
    [
        _nest(254),
        b'{"object":"chat.completion","usage":{"prompt_tokens":' + b"1" * 640 + b"}}",
        b'{"object":"chat.completion","model":"\\ud800","usage":{"prompt_tokens":2}}',
        b'{"object":"chat.completion","model":"\xf4\x8f\xbf\xbf","usage":{"prompt_tokens":2}}',
        b'{"object":"chat.completion","usage":{"prompt_tokens":1e400}}',
        b' {"object":"chat.completion","usage":{"prompt_tokens":4}}\r\n',
    ],
)
def test_the_happy_path_reaches_its_edges(body: bytes) -> None:
    """These are vouched for (not merely left to Python): the checks above them bite."""
    assert check_scan(body) is not None


@needs_compiled
@pytest.mark.parametrize(
    "body",
    [
        _nest(255),
        b'{"object":"chat.completion","usage":{"prompt_tokens":' + b"1" * 641 + b"}}",
        b'{"object":"chat.completion","\\u0075sage":{"prompt_tokens":4}}',
        b'{"object":"chat.completion","model":"\xed\xa0\x80","usage":{"prompt_tokens":2}}',
        b'{"object":"chat.completion","usage":{"prompt_tokens":NaN}}',
        b'[{"usageMetadata":{"promptTokenCount":3}}]',
    ],
)
def test_outside_the_happy_path_the_scan_does_not_know(body: bytes) -> None:
    assert scan is not None
    assert scan(body, KEYS) is None


@needs_compiled
def test_real_answers_are_vouched_for_with_their_members() -> None:
    for body in (
        wire.OPENAI_CHAT_JSON,
        wire.OPENAI_RESPONSES_JSON,
        wire.ANTHROPIC_JSON,
        wire.GEMINI_JSON,
    ):
        assert check_scan(body) is not None


@needs_compiled
def test_arguments_are_checked() -> None:
    assert scan is not None
    with pytest.raises(TypeError):
        scan(b"{}", [b"usage"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        scan(b"{}", ("usage",))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        scan(b"{}", (b"k",) * 17)
    with pytest.raises(TypeError):
        scan(b"{}")  # type: ignore[call-arg]
    assert scan(bytearray(b'{"usage":1}'), KEYS) is None  # type: ignore[arg-type]
    assert scan(b'{"usage":1,"id":"a"}', ()) == b"{}"
    assert scan(b'{"usage":1,"id":"a"}', (b"id", b"usage")) == b'{"id":"a","usage":1}'


# -- generated documents and their mutations ------------------------------------------------------

NAMES = st.sampled_from(
    [
        "usage", "usageMetadata", "model", "modelVersion", "type", "object", "id",
        "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
        "promptTokenCount", "candidatesTokenCount", "content", "x", "usag", "é", "",
    ]
)  # fmt: skip
NUMBER_TEXTS = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.from_regex(r"\A-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,4})?([eE][-+]?[0-9]{1,3})?\Z"),
    st.sampled_from(["-0", "0.0", "1E400", "-1e-400", "4" * 641, "1.5E+2"]),
)
STRING_TEXTS = st.one_of(
    st.text(max_size=10).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.text(max_size=10).map(json.dumps),
    st.sampled_from(
        ['"\\ud800"', '"\\\\"', '"\\""', '"usage"', '"\\/\\b\\f"', '"chat.completion"']
    ),
)
WS = st.sampled_from(["", "", " ", "\n  ", "\t", "\r\n"])


@st.composite
def json_text(draw: st.DrawFn, depth: int = 0) -> str:
    """A JSON text with varied whitespace, number spellings and duplicate keys."""
    kind = draw(st.integers(0, 6 if depth < 4 else 3))
    ws = draw(WS)
    if kind == 0:
        return draw(NUMBER_TEXTS)
    if kind == 1:
        return draw(STRING_TEXTS)
    if kind == 2:
        return draw(st.sampled_from(["true", "false", "null"]))
    if kind == 3:
        return draw(NUMBER_TEXTS)
    if kind == 4:
        items = draw(st.lists(json_text(depth + 1), max_size=4))
        return "[" + ws + ("," + ws).join(items) + ws + "]"
    pairs = draw(st.lists(st.tuples(NAMES, json_text(depth + 1)), max_size=5))
    return "{" + ws + ("," + ws).join(json.dumps(k) + ws + ":" + ws + v for k, v in pairs) + "}"


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    """A top-level object with the read keys (some repeated, some decoys nested)."""
    ws = draw(WS)
    pairs = draw(
        st.lists(
            st.tuples(
                NAMES,
                st.one_of(
                    json_text(),
                    st.sampled_from(['"chat.completion"', '"message"', '"resp_1"', '"m"']),
                    st.fixed_dictionaries(
                        {
                            "prompt_tokens": st.integers(-2, 10**13),
                            "completion_tokens": st.integers(0, 100),
                            "input_tokens": st.integers(0, 100),
                            "promptTokenCount": st.integers(0, 100),
                        }
                    ).map(json.dumps),
                ),
            ),
            max_size=9,
        )
    )
    text = ws + "{" + ws + ("," + ws).join(f"{json.dumps(k)}{ws}:{ws}{v}" for k, v in pairs)
    return (text + ws + "}" + draw(WS)).encode("utf-8", "surrogatepass")


MUTATIONS = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 2000), st.just(b"")),
    st.tuples(st.just("flip"), st.integers(0, 2000), st.binary(min_size=1, max_size=1)),
    st.tuples(st.just("insert"), st.integers(0, 2000), st.binary(min_size=1, max_size=3)),
    st.tuples(
        st.just("insert"),
        st.integers(0, 2000),
        st.sampled_from([b"\\", b'"', b"{", b"[", b"]", b"}", b",", b":", b"NaN", b"\xed\xa0\x80"]),
    ),
    st.tuples(st.just("prefix"), st.just(0), st.sampled_from([b"\xef\xbb\xbf", b"\x00", b"\x0c"])),
)


def mutate(body: bytes, how: tuple[str, int, bytes]) -> bytes:
    kind, at, data = how
    at = at % (len(body) + 1)
    if kind == "cut":
        return body[:at]
    if kind == "flip":
        return body[:at] + data + body[at + 1 :]
    if kind == "insert":
        return body[:at] + data + body[at:]
    return data + body


@needs_compiled
@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=answers(), mutations=st.lists(MUTATIONS, max_size=2))
def test_generated_answers_and_their_mutations(
    body: bytes, mutations: list[tuple[str, int, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for how in mutations:
        body = mutate(body, how)
    assume(b"usage" in body or not mutations)
    check_scan(body)
    both_forms(body, monkeypatch)


# -- the compiled counts of known shapes (topscan.counts) ------------------------------------


def _openai(usage: str, top: str = '"object":"chat.completion","model":"gpt-4o"') -> bytes:
    return ("{" + top + ',"usage":' + usage + "}").encode()


def _anthropic(usage: str, model: str = '"claude-x"') -> bytes:
    return ('{"type":"message","model":' + model + ',"usage":' + usage + "}").encode()


def _gemini(meta: str, model: str = '"gemini-2.5-flash"') -> bytes:
    return ('{"modelVersion":' + model + ',"usageMetadata":' + meta + "}").encode()


MAX = 10**12
RESPONSE = '"object":"response"'
CHAT = '"object":"chat.completion"'
GPT = "gpt-4o"
NO_MODEL_READ = ("openai", None, 1, 0, 0, 0)
PLAIN_READ = ("openai", GPT, 10, 0, 5, 0)
CACHED_9 = '"prompt_tokens_details":{"cached_tokens":9}'
REASONING_4 = '"output_tokens_details":{"reasoning_tokens":4}'
COUNT_EDGES = [
    # OpenAI Chat Completions: details absent, null, objects, duplicated, junk
    _openai('{"prompt_tokens":10,"completion_tokens":5}'),
    _openai('{"prompt_tokens":10}'),
    _openai('{"completion_tokens":5}'),
    _openai('{"prompt_tokens":null,"completion_tokens":5}'),
    _openai('{"prompt_tokens":null,"completion_tokens":null}'),
    _openai('{"prompt_tokens":null,"completion_tokens":null,"input_tokens":3}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":null}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{}}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":10}}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":11}}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":null}}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":1.0}}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":-1}}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":"1"}}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":[]}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":0}'),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"c\\u0061ched_tokens":4}}'),
    _openai(
        '{"prompt_tokens":10,"completion_tokens":5,"completion_tokens_details":'
        '{"reasoning_tokens":5,"audio_tokens":null,"accepted_prediction_tokens":0,'
        '"x":{"reasoning_tokens":[1,{"a":2}]}}}'
    ),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"completion_tokens_details":{"reasoning_tokens":6}}'),
    _openai(
        '{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":4},'
        '"prompt_tokens_details":{"cached_tokens":1},"completion_tokens":7}'
    ),
    _openai(
        '{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":2,"cached_tokens":3},'
        '"completion_tokens":5,"prompt_tokens":12}'
    ),
    _openai('{"prompt_tokens":10,"completion_tokens":5,"input_tokens_details":{"cached_tokens":9}}'),
    # counts at and past the bounds, and every spelling that is not a plain count
    _openai(f'{{"prompt_tokens":{MAX},"completion_tokens":{MAX}}}'),
    _openai(f'{{"prompt_tokens":{MAX + 1},"completion_tokens":1}}'),
    _openai(f'{{"prompt_tokens":{10 * MAX},"completion_tokens":1}}'),
    _openai(f'{{"prompt_tokens":{10**19},"completion_tokens":1}}'),
    _openai(f'{{"prompt_tokens":{10**30},"completion_tokens":1}}'),
    *(
        _openai('{"prompt_tokens":' + n + ',"completion_tokens":5}')
        for n in ("0", "-0", "-1", "1.0", "1e2", "1E2", "0.0", "true", "false", '"3"', "[]", "{}")
    ),
    # OpenAI Responses API names
    _openai(
        '{"input_tokens":20,"output_tokens":9,"input_tokens_details":{"cached_tokens":5},'
        '"output_tokens_details":{"reasoning_tokens":4},"total_tokens":29}',
        '"object":"response","id":"resp_1","model":"o4-mini"',
    ),
    _openai('{"input_tokens":20,"output_tokens_details":{"reasoning_tokens":1}}', RESPONSE),
    _openai('{"input_tokens":20,"output_tokens":3,' + REASONING_4 + "}", RESPONSE),
    _openai('{"input_tokens":20,"output_tokens":3,' + CACHED_9 + "}", RESPONSE),
    _openai('{"output_tokens":3}', '"object":"text_completion"'),
    # usage missing, null, not an object; the object names that tell OpenAI, and those that do not
    _openai("null"),
    _openai("[]"),
    _openai('"usage"'),
    _openai("{}"),
    _openai('{"total_tokens":5}'),
    _openai('{"prompt_tokens":1}', '"object":"chat.completion.chunk"'),
    _openai('{"prompt_tokens":1}', '"object":"chat.c\\u006fmpletion"'),
    _openai('{"prompt_tokens":1}', '"object":1'),
    _openai('{"prompt_tokens":1}', '"id":"resp_1"'),
    _openai('{"input_tokens":1,"output_tokens":2}', '"id":"resp_1"'),
    _openai('{"input_tokens":1,"output_tokens":2}', '"id":"msg_1"'),
    _openai('{"prompt_tokens":1,"pr\\u006fmpt_tokens":7}'),
    _openai('{"prompt_tokens":1}', '"object":"chat.completion","object":"list"'),
    _openai('{"prompt_tokens":1}', '"object":"list","object":"chat.completion"'),
    # models: plain, empty, at and past the length bound, escapes, non-ASCII, DEL, not strings
    *(
        _openai('{"prompt_tokens":1}', '"object":"chat.completion","model":' + m)
        for m in (
            '"gpt-4o"', '""', '" "', '"' + "m" * 256 + '"', '"' + "m" * 257 + '"', '"a\\u0062"',
            '"a\\nb"', '"caf\xc3\xa9"'.encode("latin-1").decode("utf-8"), '"a\x7fb"', "null",
            "1", "[]", '{"name":"gpt"}', "true",
        )
    ),
    _openai('{"prompt_tokens":1}', '"object":"chat.completion","model":"a","model":"b"'),
    # Anthropic
    _anthropic('{"input_tokens":20,"output_tokens":7}'),
    _anthropic(
        '{"input_tokens":20,"cache_creation_input_tokens":100,"cache_read_input_tokens":300,'
        '"output_tokens":7,"service_tier":"standard","server_tool_use":{"web_search_requests":1}}'
    ),
    _anthropic('{"input_tokens":null,"output_tokens":null}'),
    _anthropic('{"cache_read_input_tokens":3}'),
    _anthropic('{"service_tier":"standard"}'),
    _anthropic(f'{{"input_tokens":{MAX},"cache_creation_input_tokens":1}}'),
    _anthropic(f'{{"input_tokens":{MAX},"cache_creation_input_tokens":0}}'),
    _anthropic('{"input_tokens":-3,"output_tokens":7}'),
    _anthropic('{"input_tokens":20,"output_tokens":7}', "null"),
    _anthropic('{"input_tokens":20,"output_tokens":7}', '"\\u0063laude"'),
    b'{"type":"mess\\u0061ge","model":"c","usage":{"input_tokens":1,"output_tokens":2}}',
    b'{"type":"message ","model":"c","usage":{"input_tokens":1,"output_tokens":2}}',
    b'{"type":"message","object":"chat.completion","usage":{"prompt_tokens":1,"input_tokens":2}}',
    # Gemini
    _gemini(
        '{"promptTokenCount":412,"candidatesTokenCount":287,"totalTokenCount":950,'
        '"thoughtsTokenCount":251,"promptTokensDetails":[{"modality":"TEXT","tokenCount":412}]}'
    ),
    _gemini(
        '{"promptTokenCount":412,"cachedContentTokenCount":400,"toolUsePromptTokenCount":3,'
        '"candidatesTokenCount":2}'
    ),
    _gemini('{"promptTokenCount":4,"cachedContentTokenCount":5}'),
    _gemini('{"trafficType":"ON_DEMAND"}'),
    _gemini("null"),
    _gemini(f'{{"promptTokenCount":{MAX},"toolUsePromptTokenCount":1}}'),
    _gemini('{"promptTokenCount":4}', '"gemini\\u002d2"'),
    _gemini('{"promptTokenCount":4}', "null"),
    b'{"usageMetadata":{"promptTokenCount":4},"type":"message","usage":{"input_tokens":1}}',
    b'[{"usageMetadata":{"promptTokenCount":3},"modelVersion":"g"}]',
    # the model's own usage keys, nested, are never read
    JSON_MODE,
    TOOL_USE,
    # not vouched for: broken before or after the usage
    _openai('{"prompt_tokens":10,"completion_tokens":5}')[:-1],
    b'{"x":[1,}' + _openai('{"prompt_tokens":10}')[1:],
]  # fmt: skip


@needs_compiled
@pytest.mark.parametrize("body", COUNT_EDGES)
def test_counts_edges(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    both_forms(body, monkeypatch)


@needs_compiled
@pytest.mark.parametrize(
    ("body", "mode", "expected"),
    [
        (_openai('{"prompt_tokens":10,"completion_tokens":5}'), "auto", PLAIN_READ),
        (
            _openai(
                '{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":'
                '{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}'
            ),
            "openai",
            ("openai", "gpt-4o", 6, 4, 3, 2),
        ),
        (_openai(f'{{"prompt_tokens":{MAX}}}'), "openai", ("openai", "gpt-4o", MAX, 0, 0, 0)),
        (_openai('{"prompt_tokens":0,"completion_tokens":0}'), "auto", ("openai", GPT, 0, 0, 0, 0)),
        (
            _anthropic(
                '{"input_tokens":20,"cache_creation_input_tokens":100,'
                '"cache_read_input_tokens":300,"output_tokens":7}'
            ),
            "auto",
            ("anthropic", "claude-x", 120, 300, 7, 0),
        ),
        (
            _gemini(
                '{"promptTokenCount":412,"cachedContentTokenCount":400,'
                '"toolUsePromptTokenCount":3,"candidatesTokenCount":2,"thoughtsTokenCount":9}'
            ),
            "auto",
            ("gemini", "gemini-2.5-flash", 15, 400, 2, 9),
        ),
        *(
            (_openai('{"prompt_tokens":1}', CHAT + ',"model":' + model), "auto", NO_MODEL_READ)
            for model in ('""', '"' + "m" * 257 + '"', "7")
        ),
        (JSON_MODE, "auto", ("openai", "gpt-4o-mini", 12, 0, 5, 0)),
        (TOOL_USE, "auto", ("anthropic", "claude-sonnet-4-20250514", 20, 0, 7, 0)),
    ],
)  # fmt: skip
def test_counts_of_the_usual_answers(body: bytes, mode: str, expected: tuple[object, ...]) -> None:
    """These the compiled reading answers itself (not merely leaves to Python)."""
    assert counts is not None
    assert counts(body, responses.MODE_CODES[mode]) == expected
    assert fields(usage_from_json(body, mode) or Usage("openai", "?")) == expected


@needs_compiled
@pytest.mark.parametrize(
    "body",
    [
        _openai("null"),  # missing: Python says so
        _openai('{"prompt_tokens":1.0}'),  # not a count: Python refuses it
        _openai(f'{{"prompt_tokens":{MAX + 1}}}'),
        _openai('{"prompt_tokens":1}', '"object":"chat.completion","model":"a\\u0062"'),
        _openai('{"prompt_tokens":1}', '"object":"chat.completion","model":"caf\xc3\xa9"'),
        _openai('{"prompt_tokens":1}', '"object":"chat.c\\u006fmpletion"'),
        _openai('{"input_tokens":1,"output_tokens":2}', '"id":"resp_1"'),  # told by the keys
        _openai('{"prompt_tokens":1,"pr\\u006fmpt_tokens":7}'),
        _anthropic(f'{{"input_tokens":{MAX},"cache_creation_input_tokens":1}}'),
        b'[{"usageMetadata":{"promptTokenCount":3},"modelVersion":"g"}]',
    ],
)
def test_counts_leave_the_rest_to_python(body: bytes) -> None:
    assert counts is not None
    assert counts(body, 0) is None


@needs_compiled
def test_counts_arguments_are_checked() -> None:
    assert counts is not None
    with pytest.raises(TypeError):
        counts(b"{}")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        counts(b"{}", "auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        counts(b"{}", 4)
    assert counts(bytearray(_openai('{"prompt_tokens":1}')), 0) is None  # type: ignore[arg-type]
    for body in (
        wire.OPENAI_CHAT_JSON,
        wire.OPENAI_RESPONSES_JSON,
        wire.ANTHROPIC_JSON,
        wire.GEMINI_JSON,
    ):
        assert counts(body, 0) is not None


COUNT = st.one_of(
    st.integers(0, 10**6).map(str),
    st.sampled_from([str(MAX), str(MAX + 1), "null", "-1", "1.0", "0", '"2"', "true", "1e3"]),
)
USAGE_KEYS = st.sampled_from(
    [
        "prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
        "cache_creation_input_tokens", "cache_read_input_tokens", "promptTokenCount",
        "cachedContentTokenCount", "toolUsePromptTokenCount", "candidatesTokenCount",
        "thoughtsTokenCount", "service_tier",
    ]
)  # fmt: skip
DETAIL_KEYS = st.sampled_from(
    [
        "prompt_tokens_details",
        "completion_tokens_details",
        "input_tokens_details",
        "output_tokens_details",
    ]
)


@st.composite
def usage_objects(draw: st.DrawFn) -> str:
    """A usage object of counts, some repeated or junk, with OpenAI detail objects."""
    pairs = [
        json.dumps(draw(USAGE_KEYS)) + ":" + draw(COUNT) for _ in range(draw(st.integers(0, 6)))
    ]
    for _ in range(draw(st.integers(0, 3))):
        inner = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["cached_tokens", "reasoning_tokens", "audio_tokens"]), COUNT
                ),
                max_size=3,
            )
        )
        value = draw(
            st.sampled_from(
                ["{" + ",".join(f'"{k}":{v}' for k, v in inner) + "}", "null", "[]", "3"]
            )
        )
        pairs.insert(draw(st.integers(0, len(pairs))), json.dumps(draw(DETAIL_KEYS)) + ":" + value)
    return "{" + draw(WS) + ("," + draw(WS)).join(pairs) + "}"


@st.composite
def usual_answers(draw: st.DrawFn) -> bytes:
    """An answer of one of the known shapes (or a near miss), its usage drawn above."""
    tops = draw(
        st.lists(
            st.sampled_from(
                [
                    '"object":"chat.completion"', '"object":"response"', '"object":"list"',
                    '"type":"message"', '"type":"error"', '"id":"resp_1"', '"model":"gpt-4o"',
                    '"model":"claude-x"', '"modelVersion":"gemini-2.5"', '"model":null',
                    '"model":""', '"choices":[{"message":{"usage":{"prompt_tokens":7}}}]',
                ]
            ),
            max_size=4,
        )
    )  # fmt: skip
    member = draw(st.sampled_from(["usage", "usageMetadata"]))
    tops.insert(draw(st.integers(0, len(tops))), f'"{member}":' + draw(usage_objects()))
    return ("{" + ",".join(tops) + "}").encode()


@needs_compiled
@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=usual_answers(), mutations=st.lists(MUTATIONS, max_size=1))
def test_generated_usual_answers_read_alike(
    body: bytes, mutations: list[tuple[str, int, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for how in mutations:
        body = mutate(body, how)
    both_forms(body, monkeypatch)


@needs_compiled
def test_stream_key_is_bytes_find_at_every_offset_and_on_random_bodies() -> None:
    """``topscan.stream_key`` (compiled, 16 positions at a time) answers what ``bytes.find``
    answers (its pure-Python form): the key at every offset of bodies that cross the blocks'
    edges, near misses, bytearrays, and random bodies of quotes and the key's letters."""
    import random

    from gateway.usage.topscan import _stream_key

    compiled = topscan.stream_key
    assert compiled is not _stream_key
    key = b'"stream"'
    for size in range(0, 70):
        for at in range(0, max(size - len(key) + 1, 1)):
            for needle in (key, b'"strean"', b"'stream'", b'"stream', b'stream"', b'"Stream"'):
                body = (b"x" * at + needle + b'"' * size)[: max(size, at + len(needle))]
                assert compiled(body) is (body.find(key) >= 0), body
                assert compiled(bytearray(body)) is (body.find(key) >= 0), body
    rng = random.Random(20261206)
    alphabet = [b'"', b"s", b"t", b"r", b"e", b"a", b"m", key, b"x", b'"strea', b'm"', b" "]
    for _ in range(20000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert compiled(body) is _stream_key(body), body
    with pytest.raises(TypeError):
        compiled("not bytes")  # type: ignore[arg-type]


def _whitespace_runs() -> list[bytes]:
    """Runs of JSON whitespace of 0 to 40 bytes (across skip_ws's 16-byte blocks), each also
    with a byte that is not JSON whitespace (\\x0b, \\x0c, \\xa0, \\x85, \\x00) at each
    position: json.loads refuses those, and so must the scan."""
    runs: list[bytes] = []
    for n in range(41):
        run = (b" \n\t\r" * 11)[:n] if n % 3 else b"\n" + b" " * max(0, n - 1)
        runs.append(run)
        for stray in (b"\x0b", b"\x0c", b"\xa0", b"\x85", b"\x00"):
            runs += [run[:at] + stray + run[at:] for at in range(0, n + 1, 3)]
    return runs


@needs_compiled
def test_whitespace_runs_anywhere_read_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """skip_ws (one space at once, longer runs 16 bytes at a time): a run of whitespace,
    or one with a stray byte, at every place whitespace may go in a usual answer, gives
    what json.loads and the Python reading give (scan, usage and priced alike)."""
    parts = [
        b"{", b'"object":', b'"chat.completion"', b",", b'"model":', b'"gpt-4o"', b",",
        b'"choices":', b"[", b"{", b'"index":', b"0", b"}", b"]", b",", b'"usage":', b"{",
        b'"prompt_tokens":', b"41", b",", b'"completion_tokens":', b"22", b",",
        b'"prompt_tokens_details":', b"{", b'"cached_tokens":', b"3", b"}", b"}", b"}",
    ]  # fmt: skip
    runs = _whitespace_runs()
    seen = 0
    for gap in range(len(parts) + 1):
        for run in runs[:: 1 if gap in (0, 16, len(parts)) else 7]:
            body = b"".join(parts[:gap]) + run + b"".join(parts[gap:])
            if check_scan(body) is not None:
                seen += 1
            both_forms(body, monkeypatch)
    assert seen > 100  # the clean runs were vouched for

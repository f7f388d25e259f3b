"""Route matching on normalised paths: no spelling of a metered path escapes its meter."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.routing import compile_path

from gateway.config import Config, parse_config
from gateway.routing.paths import (
    AmbiguousPath,
    BadPath,
    encode_path,
    normalize_path,
    strip_path_params,
)
from gateway.routing.router import Router
from gateway.routing.templates import parse_template

A2 = """
features:
  lead_generation:   {cost: 5}
  goal_generation:   {cost: 3}
  strategy_analysis: {cost: 2}
  revenue_forecast:  {cost: 4}
  general_insights:  {cost: 1, bucket: insights}
plans: {starter: {}}
routes:
  - {method: POST, path: /api/v1/leads/generate, feature: lead_generation}
  - {method: POST, path: "/api/v1/goals/{goal_id}/quests", feature: goal_generation}
  - {method: POST, path: /api/v1/strategy/analyze, feature: strategy_analysis}
  - {method: POST, path: /api/v1/revenue/forecast, feature: revenue_forecast, cost: 9}
  - {method: GET,  path: "/api/v1/insights/{rest:path}", feature: general_insights}
"""

CONFIG = parse_config(A2, "a2.yaml")
ROUTER = Router(CONFIG)


def feature_of(method: str, raw: bytes | str, router: Router = ROUTER) -> str | None:
    """What a request would be metered as, going through normalisation like the gateway."""
    match = router.match(method, normalize_path(raw))
    return None if match is None else match.feature


LEADS = "/api/v1/leads/generate"
HOSTILE_LEADS = [
    "//api/v1/leads/generate",
    "/api/v1/leads/generate/",
    "/api/v1/leads/generate//",
    "/api/v1/./leads/generate",
    "/api/v1/x/../leads/generate",
    "/api/%76%31/leads/generate",
    "/api/v1/leads/generat%65",
    "/%61%70%69/%76%31/%6C%65%61%64%73/%67%65%6E%65%72%61%74%65",  # upper-case hex
    "/api/v1/leads//generate",
    "///api///v1///leads///generate///",
    "/./api/v1/leads/generate",
    "/../api/v1/leads/generate",
    "/../../../api/v1/leads/generate",
    "/a/b/c/../../../../../api/v1/leads/generate",
    "/api/v1/x/%2e%2e/leads/generate",  # encoded dot segments are decoded, then removed
    "/api/v1/x/.%2E/leads/generate",
    "/api/v1/leads/%2e/generate",
    "/api/v1/leads/generate/.",
    "/api/v1/leads/generate/%2e",
    "/api/v1/leads/generate/x/..",
    "/api/v1/leads/generate/x/%2e%2e/",
    "/api/v1/leads/generate/./././",
]
HOSTILE_GOALS = [
    "/api/v1/goals/12/quests",
    "/api/v1/goals/%31%32/quests",
    "/api/v1/goals/12/quests/",
    "/api/v1/goals//12//quests",
    "/api/v1/goals/12/x/../quests",
    "/api/v1/goals/%E2%9C%93/quests",  # a non-ASCII goal id is still a goal id
    "/api/v1/goals/a%20b/quests",
    "/api/v1/goals/%25/quests",  # "%" itself, decoded once
    "/api/v1/goals/12/../13/quests",
]
HOSTILE_INSIGHTS = [
    "/api/v1/insights/a",
    "/api/v1/insights/a/b/c",
    "/api/v1/insights//a",
    "/api/v1//insights/a/",
    "/api/v1/insights/a/../b",
    "/api/v1/insights/../insights/x",
    "/api/v1/%69nsights/x",
]


@pytest.mark.parametrize("raw", HOSTILE_LEADS)
@pytest.mark.parametrize("method", ["POST", "post", "Post"])
def test_hostile_spellings_of_leads_are_metered(raw: str, method: str) -> None:
    assert normalize_path(raw.encode("ascii")) == LEADS
    assert feature_of(method, raw.encode("ascii")) == "lead_generation"
    assert encode_path(normalize_path(raw)) == LEADS.encode()  # and forwarded canonically


@pytest.mark.parametrize("raw", HOSTILE_GOALS)
def test_hostile_spellings_of_goals_are_metered(raw: str) -> None:
    assert feature_of("POST", raw.encode("ascii")) == "goal_generation"


@pytest.mark.parametrize("raw", HOSTILE_INSIGHTS)
@pytest.mark.parametrize("method", ["GET", "get", "HEAD", "head"])
def test_hostile_spellings_of_insights_are_metered(raw: str, method: str) -> None:
    # HEAD runs the GET handler in Starlette: it must not be a free call.
    assert feature_of(method, raw.encode("ascii")) == "general_insights"


# Servlet containers (Tomcat, Jetty, Spring) drop ";" path parameters before routing, and
# take "..;" as "..": each of these would reach such an upstream's metered handler.
PATH_PARAM_SPELLINGS = [
    "/api/v1/leads/generate;jsessionid=abc",
    "/api/v1/leads/generate;",
    "/api;x=1/v1/leads/generate",
    "/api/v1;/leads;/generate;",
    "/public/..;/api/v1/leads/generate",
    "/api/v1/leads/x/..;/generate",
    "/api/v1/leads/generate%3Bx",
]


@pytest.mark.parametrize("raw", PATH_PARAM_SPELLINGS)
def test_path_parameters_on_a_metered_route_are_refused(raw: str) -> None:
    with pytest.raises(AmbiguousPath):
        ROUTER.resolve("POST", raw.encode("ascii"))
    with pytest.raises(AmbiguousPath):  # every time, not only before the answer is cached
        ROUTER.resolve("POST", raw.encode("ascii"))


def test_path_parameters_elsewhere_pass() -> None:
    assert ROUTER.resolve("GET", b"/static/app.js;v=3")[0] is None  # matches nothing either way
    assert ROUTER.resolve("GET", b"/api/v1/leads/generate;x")[0] is None  # no GET route there
    assert strip_path_params("/a;x=1/b;/c") == "/a/b/c"
    assert strip_path_params("/a/b/..;/c") == "/a/c"
    assert strip_path_params("/;/..;/x") == "/x"


def test_trailing_slash_is_forwarded_only_when_configured() -> None:
    keep = Router(CONFIG.model_copy(update={"forward_trailing_slash": True}))
    for raw in (b"/api/v1/leads/generate/", b"//api/v1/./leads/generate//"):
        match, path, encoded = keep.resolve("POST", raw)
        assert match is not None and match.feature == "lead_generation"  # still metered
        assert (path, encoded) == (LEADS + "/", LEADS.encode() + b"/")
        match, path, _ = ROUTER.resolve("POST", raw)  # the default strips it
        assert match is not None and path == LEADS
    assert keep.resolve("POST", LEADS.encode())[1] == LEADS
    assert keep.resolve("GET", b"/")[1] == "/"
    assert keep.resolve("GET", b"//")[1] == "/"
    assert keep.resolve("POST", b"/api/v1/leads/generate/.")[1] == LEADS


def test_case_insensitive_router_meters_every_case() -> None:
    router = Router(CONFIG, case_insensitive=True)
    for raw in ["/API/V1/LEADS/GENERATE", "/Api/v1/Leads/Generate/", "/api/%56%31/leads/GENERATE"]:
        assert feature_of("POST", raw, router) == "lead_generation"
    assert feature_of("POST", "/API/V1/GOALS/X/QUESTS", router) == "goal_generation"
    assert feature_of("HEAD", "/API/v1/Insights/Q", router) == "general_insights"
    # The default router is case-sensitive, like Starlette.
    assert feature_of("POST", "/API/v1/leads/generate") is None
    ignore_case = parse_config(A2 + "routes_ignore_case: true\n", "ci.yaml")
    assert feature_of("POST", "/API/V1/LEADS/GENERATE", Router(ignore_case)) == "lead_generation"


REJECTED = [
    b"/api/v1/leads%2Fgenerate",
    b"/api%2fv1/leads/generate",
    b"/api/v1/leads/generate%5C",
    b"/api/v1/leads%5cgenerate",
    b"/api/v1/leads\\generate",
    b"/api/v1/leads/generate%00",
    b"/api/v1/leads/generate\x00",
    b"/api/v1/leads/gen\terate",
    b"/api/v1/leads/generate\x7f",
    b"/api/v1/leads/generate%0a",
    b"/api/v1/leads/generate%0D",
    b"/api/v1/leads/generate%7F",
    b"/api/v1/leads/generate%c2%85",  # C1 control (NEL)
    b"/api/v1/lea%zzds/generate",
    b"/api/v1/leads/generate%",
    b"/api/v1/leads/generate%4",
    b"/api/v1/leads/generate%%34%31",
    b"/api/v1/leads%c0%afgenerate",  # overlong UTF-8 for "/"
    b"/api/v1/leads%e0%80%afgenerate",  # 3-byte overlong "/"
    b"/api/v1/leads/generate%ed%a0%80",  # UTF-16 surrogate
    b"/api/v1/leads/generate%ff",
    b"/api/v1/leads/generate\xff",  # raw invalid UTF-8
    b"api/v1/leads/generate",
    b"",
    b"*",
]


@pytest.mark.parametrize("raw", REJECTED)
def test_ambiguous_paths_are_rejected(raw: bytes) -> None:
    with pytest.raises(BadPath):
        normalize_path(raw)


def test_bad_path_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError, match="forbidden percent escape %2F"):
        normalize_path(b"/a%2Fb")
    with pytest.raises(BadPath, match="not valid UTF-8"):
        normalize_path(b"/a%c0%af")


def test_str_paths_and_raw_utf8() -> None:
    assert normalize_path("/caf\u00e9/x/") == "/caf\u00e9/x"
    assert normalize_path(b"/caf\xc3\xa9") == "/caf\u00e9"
    assert normalize_path("/") == normalize_path(b"/") == normalize_path(b"//") == "/"
    assert normalize_path(b"/..") == normalize_path(b"/a/..") == "/"
    with pytest.raises(BadPath):
        normalize_path("/\ud800")


def test_decoding_happens_once() -> None:
    assert normalize_path(b"/a%252Fb") == "/a%2Fb"  # not "/a/b"
    assert encode_path("/a%2Fb") == b"/a%252Fb"
    assert normalize_path(b"/%252e%252e/x") == "/%2e%2e/x"  # not a dot segment


def test_encode_path() -> None:
    assert encode_path("/api/v1/leads/generate") == b"/api/v1/leads/generate"
    assert encode_path("/a b/caf\u00e9") == b"/a%20b/caf%C3%A9"
    assert encode_path("/a?b#c") == b"/a%3Fb%23c"
    assert encode_path("/k=v;x,y:@!$&'()*+~") == b"/k=v;x,y:@!$&'()*+~"
    assert encode_path('/a"<>`{}|^') == b"/a%22%3C%3E%60%7B%7D%7C%5E"


def test_route_match_details() -> None:
    match = ROUTER.match("HEAD", "/api/v1/insights/a")
    assert match is not None
    assert (match.feature, match.bucket, match.cost, match.template, match.method) == (
        "general_insights",
        "insights",
        1,
        "/api/v1/insights/{rest:path}",
        "GET",
    )
    forecast = ROUTER.match("POST", "/api/v1/revenue/forecast")
    assert forecast is not None and forecast.cost == 9  # the route's override
    assert ROUTER.match("POST", "/api/v1/revenue/forecast") is forecast  # shared, no allocation
    assert [m.feature for m in ROUTER.routes] == [r.feature for r in CONFIG.routes]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", LEADS),  # wrong method
        ("PUT", LEADS),
        ("POST", "/api/v1/leads"),
        ("POST", "/api/v1/leads/generate/more"),
        ("POST", "/api/v1/goals/quests"),  # a str parameter is never empty
        ("POST", "/api/v1/goals/1/2/quests"),  # nor contains "/"
        ("GET", "/api/v1/insights"),  # {rest:path} needs the "/" before it
        ("POST", "/api/v1/insights/x"),
        ("GET", "/"),
    ],
)
def test_misses(method: str, path: str) -> None:
    assert ROUTER.match(method, path) is None


def _raw_config(routes: list[dict[str, Any]]) -> Config:
    # model_validate skips the meaning checks, so the router's own order handling is tested
    # even for configs that check-config would reject (e.g. unreachable routes).
    return Config.model_validate(
        {"features": {"a": {"cost": 1}, "b": {"cost": 2}, "c": {"cost": 3}}, "routes": routes}
    )


def test_first_match_wins_over_exact_fast_path() -> None:
    router = Router(
        _raw_config(
            [
                {"method": "POST", "path": "/items/{id}", "feature": "a"},
                {"method": "POST", "path": "/items/special", "feature": "b"},
                {"method": "POST", "path": "/other", "feature": "c"},
                {"method": "POST", "path": "/{x}", "feature": "a"},
            ]
        )
    )
    assert feature_of("POST", "/items/special", router) == "a"
    assert feature_of("POST", "/items/7", router) == "a"
    assert feature_of("POST", "/other", router) == "c"  # exact, before "/{x}"
    assert feature_of("POST", "/else", router) == "a"


def test_exact_before_templated_wins_only_for_its_path() -> None:
    router = Router(
        _raw_config(
            [
                {"method": "POST", "path": "/items/special", "feature": "b"},
                {"method": "POST", "path": "/items/{id:int}", "feature": "c"},
                {"method": "POST", "path": "/items/{id}", "feature": "a"},
            ]
        )
    )
    assert feature_of("POST", "/items/special", router) == "b"
    assert feature_of("POST", "/items/42", router) == "c"
    assert feature_of("POST", "/items/4x2", router) == "a"


def test_convertors() -> None:
    router = Router(
        _raw_config(
            [
                {"method": "GET", "path": "/n/{n:int}", "feature": "a"},
                {"method": "GET", "path": "/f/{x:float}/v", "feature": "b"},
                {"method": "GET", "path": "/u/{id:uuid}", "feature": "c"},
                {"method": "GET", "path": "/files/{name}.{ext}", "feature": "a"},
            ]
        )
    )
    assert feature_of("GET", "/n/123", router) == "a"
    assert feature_of("GET", "/n/-1", router) is None
    assert feature_of("GET", "/f/1.5/v", router) == "b"
    assert feature_of("GET", "/f/2/v", router) == "b"
    assert feature_of("GET", "/f/1.5.2/v", router) is None
    assert feature_of("GET", "/u/5f0c6d6e-8a9b-4c1d-9e2f-0123456789ab", router) == "c"
    assert feature_of("GET", "/u/not-a-uuid", router) is None
    assert feature_of("GET", "/files/report.pdf", router) == "a"


def test_router_without_routes() -> None:
    assert Router(_raw_config([])).match("POST", LEADS) is None


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("x", "must start with '/'"),
        ("/a/{b", "unbalanced braces"),
        ("/a/b}", "unbalanced braces"),
        ("/a/{}", "invalid parameter name ''"),
        ("/a/{1x}", "invalid parameter name '1x'"),
        ("/a/{x:int:str}", "unknown convertor 'int:str'"),
        ("/a/{x:slug}", "unknown convertor 'slug'"),
        ("/{p:path}/x", "must come last"),
        ("/a/{x}/{x}", "duplicate parameter 'x'"),
        ("/a/", "not a normalised path"),
        ("/a//b", "not a normalised path"),
        ("/a/./b", "not a normalised path"),
        ("/a%2Fb", "percent-escapes are not allowed"),
        ("/a\\b", "backslash"),
    ],
)
def test_bad_templates(template: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace("{", r"\{")):
        parse_template(template)


def test_template_shape_ignores_parameter_names() -> None:
    assert parse_template("/a/{x}/b").shape == parse_template("/a/{y:str}/b").shape
    assert parse_template("/a/{x:int}").shape != parse_template("/a/{x}").shape
    assert parse_template("/a/b").literal == "/a/b"
    assert parse_template("/a/{b}").literal is None


# Property tests: normalisation is a fixed point once re-encoded, and never lets a
# dot segment, empty segment or trailing slash through.

RAW_PIECES = st.sampled_from(
    ["/", "//", ".", "..", "a", "B", "%2e", "%2E", "%25", "%20", "%41", "%7e", "~", "é",
     "%C3%A9", "-", "_", ";", "=", "?", "%3F", "%23", ":", "@", "%2F", "\\", "%", "%zz"]
)  # fmt: skip


@settings(max_examples=500, deadline=None, database=None)
@given(st.lists(RAW_PIECES, max_size=12).map(lambda parts: "/" + "".join(parts)))
def test_normalize_properties(raw: str) -> None:
    try:
        path = normalize_path(raw)
    except BadPath:
        return
    assert path.startswith("/")
    assert path == "/" or not path.endswith("/")
    segments = path.split("/")[1:]
    assert path == "/" or all(s not in ("", ".", "..") for s in segments)
    encoded = encode_path(path)
    assert normalize_path(encoded) == path  # round trip
    assert encode_path(normalize_path(encoded)) == encoded
    if "%" not in path:
        assert normalize_path(path) == path  # idempotent


SEGMENT = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs"), blacklist_characters="/\\", max_codepoint=0x2FFFF
    ),
    min_size=1,
    max_size=8,
).filter(lambda s: s not in (".", ".."))


@settings(max_examples=500, deadline=None, database=None)
@given(st.lists(SEGMENT, max_size=6).map(lambda parts: "/" + "/".join(parts)))
def test_encode_then_normalize_round_trips(path: str) -> None:
    encoded = encode_path(path)
    assert encoded.isascii()
    assert normalize_path(encoded) == path


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=40).map(lambda b: b"/" + b))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    try:
        path = normalize_path(raw)
    except BadPath:
        return
    assert normalize_path(encode_path(path)) == path
    assert "\\" not in path and all(ch >= " " and ch != "\x7f" for ch in path)


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(alphabet="/{}:._-aZ0%\\ é", max_size=16).map(lambda t: "/" + t))
def test_parse_template_only_raises_value_error(template: str) -> None:
    try:
        parsed = parse_template(template)
    except ValueError:
        return
    # A valid template's literal, if any, is itself a normalised path that it matches.
    if parsed.literal is not None:
        assert normalize_path(encode_path(parsed.literal)) == parsed.literal


# Differential test: the compiled router (exact-path dict, per-depth combined regexes) must
# give the answer of the obvious matcher — Starlette's own compile_path, tried in order.

SEGMENTS = st.sampled_from(["a", "b", "1", "{p}", "{p:int}", "a{p}", "{p}.json"])


@st.composite
def route_tables(draw: st.DrawFn) -> list[dict[str, Any]]:
    routes = []
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        parts = draw(st.lists(SEGMENTS, min_size=0, max_size=4))
        if draw(st.booleans()) and draw(st.booleans()):
            parts.append("{p:path}")
        numbered = [part.replace("{p", f"{{p{i}") for i, part in enumerate(parts)]
        method = draw(st.sampled_from(["GET", "POST"]))
        routes.append({"method": method, "path": "/" + "/".join(numbered), "feature": "a"})
    return routes


PATHS = st.lists(st.sampled_from(["a", "b", "1", "22", "a7", "7.json", "x"]), max_size=6).map(
    lambda parts: "/" + "/".join(parts)
)


@settings(max_examples=400, deadline=None, database=None)
@given(route_tables(), st.lists(PATHS, min_size=1, max_size=10), st.booleans())
def test_router_agrees_with_ordered_starlette_matching(
    routes: list[dict[str, Any]], paths: list[str], head: bool
) -> None:
    router = Router(_raw_config(routes))
    compiled = [(r["method"], compile_path(r["path"])[0], r["path"]) for r in routes]
    for path in paths:
        for method in ("GET", "POST"):
            expected = next((t for m, rx, t in compiled if m == method and rx.match(path)), None)
            asked = "HEAD" if head and method == "GET" else method
            got = router.match(asked, path)
            assert (got.template if got else None) == expected, (method, path)

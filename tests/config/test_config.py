"""Config loading: env expansion, structure and meaning errors, derived lookups.

Each file in tests/configs/bad/ breaks one rule (named by the file) and lists the errors it
must produce in ``# expect:`` comment lines; every expected error must appear, prefixed by
the file name, and nothing else may. An expectation that starts with ``:`` is a YAML syntax
error at ``:line:column:`` (``file.yaml:7:3: ...``, the form editors and terminals link);
any other names a key path (``file.yaml: routes[3].feature: ...``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import (
    Config,
    ConfigError,
    ConfigLocation,
    FeatureConfig,
    ParsedRateLimit,
    PlanConfig,
    RateLimitConfig,
    check_config,
    load_config,
    locate_config,
    parse_config,
    parse_rate,
    resolve_config_path,
)
from gateway.core.anchors import Calendar

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
BAD = sorted((CONFIGS / "bad").glob("*.yaml"))
EXAMPLE = ROOT / "examples" / "creditgate.yaml"
EXAMPLE_ENV = {
    "CREDITGATE_ADMIN_TOKEN": "admin-token-for-tests",
    "SUPABASE_JWT_SECRET": "jwt-secret-for-tests",
    "STRIPE_WEBHOOK_SECRET": "whsec_for_tests",
}

MINIMAL = """
features:
  lead_generation: {cost: 5}
plans:
  starter: {}
  pro: {allocations: {lead_generation: 60}}
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*EXAMPLE_ENV, "CREDITGATE_REDIS_URL", "CREDITGATE_DATABASE_URL"]:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("CGTEST_"):
            monkeypatch.delenv(name)


def _expectations(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.removeprefix("# expect: ") for line in lines if line.startswith("# expect: ")]


def test_there_is_a_bad_file_per_rule() -> None:
    assert len(BAD) >= 50
    assert all(_expectations(p) for p in BAD), "every bad file must say what it expects"


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config(path: Path) -> None:
    expected = _expectations(path)
    errors = check_config(path)
    for want in expected:
        prefix = f"{path}{want}" if want.startswith(":") else f"{path}: {want}"
        assert any(e.startswith(prefix) for e in errors), f"missing {prefix!r} in {errors}"
    assert len(errors) == len(expected), errors
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == errors
    assert str(info.value) == "\n".join(errors)


def test_several_errors_are_all_reported() -> None:
    errors = check_config(CONFIGS / "bad" / "several_errors.yaml")
    assert len(errors) == 8


def test_example_loads_with_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)
    config = load_config(EXAMPLE)
    assert config.admin_token == "admin-token-for-tests"
    assert config.identity.jwt is not None
    assert config.identity.jwt.secret == "jwt-secret-for-tests"
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.database_url == "postgresql://postgres@127.0.0.1:5432/creditgate"
    assert [r.feature for r in config.routes][:2] == ["lead_generation", "goal_generation"]
    assert config.allocation("pro", "goal_generation") == 20
    assert config.allocation("starter", "goal_generation") is None
    assert config.rate_limits_of("pro") == (
        ParsedRateLimit("org", 60, 60_000, "o:60/60000"),
        ParsedRateLimit("user", 20, 60_000, "u:20/60000"),
    )
    assert config.buckets == (
        "general_insights",
        "goal_generation",
        "lead_generation",
        "revenue_forecast",
        "strategy_analysis",
    )


def test_example_without_environment_names_every_variable() -> None:
    errors = check_config(EXAMPLE)
    assert errors == [
        f"{EXAMPLE}: admin_token: empty (environment variable CREDITGATE_ADMIN_TOKEN is not set)",
        f"{EXAMPLE}: identity.jwt.secret: empty"
        " (environment variable SUPABASE_JWT_SECRET is not set)",
        f"{EXAMPLE}: billing.stripe.webhook_secret: empty"
        " (environment variable STRIPE_WEBHOOK_SECRET is not set)",
    ]


def test_minimal_good_file_uses_defaults() -> None:
    config = load_config(CONFIGS / "good" / "minimal.yaml")
    assert config.default_plan == "starter"
    assert config.calendar == Calendar("month", "calendar", "UTC")
    assert config.shards == 16 and config.key_prefix == "cg"
    assert config.routes[0].method == "POST"  # normalised from "post"
    assert config.identity.api_keys is True and config.identity.jwt is None
    assert config.billing.stripe is None
    assert config.rate_limits_of("pro") == ()


def test_full_good_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGTEST_SHARDS", "128")
    config = load_config(CONFIGS / "good" / "full.yaml")
    assert config.redis_url == "rediss-cluster://cache.internal:7000"
    assert config.database_url is None  # empty -> no database
    assert config.admin_token == "${not_a_var}-admin"
    assert config.shards == 128  # from the environment, coerced to int
    assert config.key_prefix == "cgx"
    assert config.calendar.kind == "weekly" and config.routes_ignore_case
    assert config.bucket_of("chat") == config.bucket_of("chat_long") == "messages"
    assert config.bucket_of("image") == "image"
    assert config.buckets == ("image", "messages")
    assert config.cost_of("chat_long") == 4
    assert [r.method for r in config.routes] == ["POST", "POST", "PUT", "GET", "GET"]
    assert [rl.id for rl in config.rate_limits_of("team")] == [
        "o:100/1000",
        "o:100000/86400000",
        "u:30/60000",
    ]
    assert config.rate_limits_of("free") == (ParsedRateLimit("user", 10, 300_000, "u:10/300000"),)
    assert config.plan_allocations("image") == {"team": 100}
    assert config.allocation("nope", "image") is None
    with pytest.raises(KeyError):
        config.bucket_of("nope")


def test_env_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGTEST_HOST", "redis.internal")
    monkeypatch.setenv("CGTEST_EMPTY", "")
    text = (
        "redis_url: redis://${CGTEST_HOST}:${CGTEST_PORT:-6380}/0\n"
        "upstream: ${CGTEST_UPSTREAM:-http://app:9000}\n"
        "admin_token: ${CGTEST_EMPTY:-fallback}-$${CGTEST_HOST}-$$-${CGTEST_HOST}\n"
        "key_prefix: ${CGTEST_MISSING}cg\n"
        "features:\n  lead_generation: {cost: '${CGTEST_COST:-7}'}\n"
        "plans:\n  starter: {}\n"
    )
    config = parse_config(text, "env.yaml")
    assert config.redis_url == "redis://redis.internal:6380/0"
    assert config.upstream == "http://app:9000"
    # ":-" also replaces a variable that is set but empty; "$${" is a literal "${".
    assert config.admin_token == "fallback-${CGTEST_HOST}-$$-redis.internal"
    assert config.key_prefix == "cg"  # unset without default expands to ""
    assert config.cost_of("lead_generation") == 7


def test_env_expansion_leaves_keys_and_non_strings_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGTEST_NAME", "renamed")
    text = MINIMAL + (
        "billing:\n  stripe:\n    webhook_secret: w\n"
        "    plans: {'${CGTEST_NAME}': pro}\n"
        "    topups: {t: {bucket: lead_generation, amount: 5, expires_in_days: 9}}\n"
    )
    stripe = parse_config(text, "k.yaml").billing.stripe
    assert stripe is not None
    assert stripe.plans == {"${CGTEST_NAME}": "pro"}
    assert stripe.topups["t"].expires_in_days == 9


def test_required_value_from_unset_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL + "upstream: ${CGTEST_UPSTREAM}\n", "creditgate.yaml")
    assert info.value.errors == [
        "creditgate.yaml: upstream: empty (environment variable CGTEST_UPSTREAM is not set)"
    ]
    monkeypatch.setenv("CGTEST_UPSTREAM", "http://127.0.0.1:9000")
    assert parse_config(MINIMAL + "upstream: ${CGTEST_UPSTREAM}\n", "c.yaml").upstream


def test_database_url_empty_means_no_database() -> None:
    assert parse_config(MINIMAL + "database_url: ''\n", "c.yaml").database_url is None
    assert parse_config(MINIMAL + "database_url: null\n", "c.yaml").database_url is None
    assert parse_config(MINIMAL + "database_url: ${CGTEST_DB}\n", "c.yaml").database_url is None


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert check_config(missing) == [f"{missing}: cannot read: No such file or directory"]
    assert check_config(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"features: \xff\xfe\n")
    assert check_config(binary) == [f"{binary}: not UTF-8 text (byte 10)"]


def test_resolve_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDITGATE_CONFIG", raising=False)
    assert resolve_config_path(None) == Path("creditgate.yaml")
    monkeypatch.setenv("CREDITGATE_CONFIG", "/etc/cg.yaml")
    assert resolve_config_path(None) == Path("/etc/cg.yaml")
    assert resolve_config_path("x.yaml") == Path("x.yaml")


def test_locate_config_says_where_the_path_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDITGATE_CONFIG", raising=False)
    assert locate_config(None) == ConfigLocation(Path("creditgate.yaml"), "default")
    monkeypatch.setenv("CREDITGATE_CONFIG", "")  # empty counts as unset
    assert locate_config(None) == ConfigLocation(Path("creditgate.yaml"), "default")
    monkeypatch.setenv("CREDITGATE_CONFIG", "/etc/cg.yaml")
    assert locate_config(None) == ConfigLocation(Path("/etc/cg.yaml"), "environment")
    assert locate_config("x.yaml") == ConfigLocation(Path("x.yaml"), "option")


def test_proxy_mode_needs_upstream_and_says_so_with_the_other_errors() -> None:
    expected = (
        "c.yaml: upstream: required to run the proxy (creditgate serve): the URL of the app"
        " to forward requests to, e.g. upstream: http://127.0.0.1:9000"
        " (for a config used only as middleware or library, check it with --mode middleware)"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL + "shards: 0\n", "c.yaml", mode="proxy")
    assert info.value.errors == [expected, "c.yaml: shards: must be positive, got 0"]
    assert check_config(CONFIGS / "good" / "minimal.yaml", mode="proxy") == [
        expected.replace("c.yaml", str(CONFIGS / "good" / "minimal.yaml"))
    ]
    # Middleware and library use need no upstream; neither does loading without a mode.
    assert check_config(CONFIGS / "good" / "minimal.yaml", mode="middleware") == []
    assert check_config(CONFIGS / "good" / "minimal.yaml") == []
    assert parse_config(MINIMAL + "upstream: http://app:9000\n", "c.yaml", mode="proxy").upstream


def test_structure_errors_leave_the_rest_checked() -> None:
    """The loader reports pydantic's errors and the meaning errors of what they leave intact,
    in one run: structure errors first (in the schema's order), then meaning errors."""
    text = (
        "admin_token: ${CGTEST_NOPE}\n"
        "shards: many\n"
        "features:\n  a: {cost: 1.5}\n  b: {cost: -3}\n"
        "plans:\n  starter: {}\n"
        "default_plan: gold\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    assert info.value.errors == [
        "c.yaml: features.a.cost: expected an integer, got float 1.5",
        "c.yaml: shards: expected an integer, got 'many'",
        "c.yaml: admin_token: empty (environment variable CGTEST_NOPE is not set)",
        "c.yaml: features.b.cost: must be positive, got -3",
        "c.yaml: default_plan: unknown plan 'gold' (known: starter)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60/minute", (60, 60_000)),
        ("60/minutes", (60, 60_000)),
        ("1/second", (1, 1000)),
        ("100/5minutes", (100, 300_000)),
        ("24/hour", (24, 3_600_000)),
        ("1000 / 2 days", (1000, 172_800_000)),
        ("5/Minute", (5, 60_000)),
    ],
)
def test_parse_rate(text: str, expected: tuple[int, int]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    "text", ["60/fortnight", "0/minute", "x/minute", "60", "60/", "/minute", "-1/minute", "5/0day"]
)
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="malformed rate"):
        parse_rate(text)


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL, "c.yaml")
    with pytest.raises(ValueError):
        config.shards = 3
    assert isinstance(config, Config)


GOOD_TEXT = (CONFIGS / "good" / "full.yaml").read_text(encoding="utf-8")


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.integers(min_value=0, max_value=len(GOOD_TEXT) - 1),
    st.integers(min_value=0, max_value=40),
    st.text(alphabet="{}[]:,-'\"&*!|>%@`#$ \n\tax0/.\x00\x07\u00e9", max_size=6),
)
def test_mangled_config_never_crashes(start: int, length: int, insert: str) -> None:
    """Any corruption of a good file gives a Config or a ConfigError, never a traceback."""
    text = GOOD_TEXT[:start] + insert + GOOD_TEXT[start + length :]
    try:
        parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.errors
        assert all(e.startswith("fuzz.yaml:") for e in exc.errors)


def test_model_copy_recomputes_derived_lookups() -> None:
    config = parse_config(MINIMAL, "c.yaml")
    assert config.buckets == ("lead_generation",)  # computed and cached on the original
    limit = RateLimitConfig(per="org", limit="5/second")
    copy = config.model_copy(
        update={
            "features": {"image": FeatureConfig(cost=2, bucket="pixels")},
            "plans": {"pro": PlanConfig(rate_limits=[limit])},
        }
    )
    assert copy.buckets == ("pixels",)
    assert copy.bucket_of("image") == "pixels"
    assert [rl.id for rl in copy.rate_limits_of("pro")] == ["o:5/1000"]
    assert config.buckets == ("lead_generation",) and config.rate_limits_of("pro") == ()


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["", "${CGTEST_X}", "${CGTEST_X:-1}", "60/minute", "/a/{b}", "GET", "pro"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


GOOD_TREE = yaml.safe_load(GOOD_TEXT)
GOOD_PATHS = _paths(GOOD_TREE)


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.sampled_from(GOOD_PATHS), VALUES)
def test_any_value_anywhere_never_crashes(path: tuple[Any, ...], value: Any) -> None:
    """Replacing any value of a good file by anything gives a Config or a ConfigError."""
    tree = copy.deepcopy(GOOD_TREE)
    parent = tree
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    try:
        parse_config(yaml.safe_dump(tree), "fuzz.yaml")
    except ConfigError as exc:
        assert exc.errors
        assert all(e.startswith("fuzz.yaml:") for e in exc.errors)


def test_settle_wait_replicas_is_off_by_default_and_checked() -> None:
    config = parse_config(MINIMAL, "c.yaml")
    assert (config.settle_wait_replicas, config.settle_wait_timeout_ms) == (0, 100)
    on = parse_config(MINIMAL + "settle_wait_replicas: 1\nsettle_wait_timeout_ms: 20\n", "c.yaml")
    assert (on.settle_wait_replicas, on.settle_wait_timeout_ms) == (1, 20)
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL + "settle_wait_replicas: -1\nsettle_wait_timeout_ms: 0\n", "c.yaml")
    assert [e.split(":")[1].strip() for e in info.value.errors] == [
        "settle_wait_replicas",
        "settle_wait_timeout_ms",
    ]

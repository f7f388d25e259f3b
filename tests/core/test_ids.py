"""One id rule (gateway.core.ids), equal to the ledger's, checked at every entry point.

Before the rule was applied to the library, ``gate.charge("")`` (or a 300-character id, or
one with NUL) took tokens in Redis and the sync job then dead-lettered the event: a charge
without its ledger row. The identity layer's and the HTTP APIs' own checks are tested in
tests/identity and tests/http; the API's answers for bad ids in tests/http/test_admin_api.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner

from gateway.commands.cli import main
from gateway.core.ids import ID_PATTERN, MAX_ID_LENGTH, InvalidId, check_id, valid_id
from tests.support.api_support import Env, make_env
from tests.support.pg import requires_postgres

BAD = ["", "x" * 300, "nul\x00byte", "has space", "caf\u00e9", "tab\there", "x" * 201]
LEDGER_REFUSES = ["", "x" * 300, "nul\x00byte"]  # what the sync job dead-lettered


def test_the_rule_and_its_pattern_agree() -> None:
    pattern = re.compile(ID_PATTERN)
    for n in range(0x3000):
        c = chr(n)
        assert valid_id(c) == bool(pattern.match(c)), repr(c)
    for value in ["a" * MAX_ID_LENGTH, "a" * (MAX_ID_LENGTH + 1), *BAD]:
        assert valid_id(value) == bool(pattern.match(value)), value[:20]
    assert not valid_id(None) and not valid_id(42) and not valid_id(b"acme")


def test_check_id_says_what_is_wrong() -> None:
    assert check_id("acme") == "acme"
    with pytest.raises(InvalidId, match=r"user id 'a b' is not valid: it must be 1-200"):
        check_id("a b", "user")
    with pytest.raises(ValueError, match=r"'xxxx.*'\.\.\. is not valid"):
        check_id("x" * 300)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env():
        yield e


async def _nothing_written(env: Env) -> None:
    client = env.gate.redis.client
    keys = [k async for k in client.scan_iter(match=f"{env.gate.config.key_prefix}:*")]
    assert keys == []
    store = await env.gate.require_store()
    assert await store.pool.fetchval("SELECT count(*) FROM organizations") == 0


@requires_postgres
@pytest.mark.parametrize("bad", BAD, ids=lambda v: repr(v)[:12])
async def test_the_library_refuses_a_bad_org_id_and_takes_nothing(env: Env, bad: str) -> None:
    gate = env.gate
    with pytest.raises(InvalidId):
        await gate.set_plan(bad, "pro")
    with pytest.raises(InvalidId):
        await gate.charge(bad, "goal_generation", user="alice")
    with pytest.raises(InvalidId):
        await gate.check(bad, "goal_generation")
    with pytest.raises(InvalidId):
        await gate.balance(bad)
    with pytest.raises(InvalidId):
        await gate.stats(bad)
    with pytest.raises(InvalidId):
        await gate.grant(bad, "goal_generation", 5, reference="r")
    with pytest.raises(InvalidId):
        await gate.create_key(bad)
    await _nothing_written(env)


@requires_postgres
@pytest.mark.parametrize("bad", BAD, ids=lambda v: repr(v)[:12])
async def test_the_library_refuses_a_bad_user_id(env: Env, bad: str) -> None:
    gate = env.gate
    with pytest.raises(InvalidId, match="user id"):
        await gate.charge("acme", "goal_generation", user=bad)
    with pytest.raises(InvalidId, match="user id"):
        await gate.create_key("acme", user=bad)
    await _nothing_written(env)


@requires_postgres
async def test_every_id_the_rule_accepts_reaches_the_ledger(env: Env) -> None:
    # The longest id, made of the rule's first and last characters, is charged and synced
    # like any other: nothing the library accepts is dead-lettered.
    org, user = "!" + "~" * (MAX_ID_LENGTH - 2) + "!", "u" * MAX_ID_LENGTH
    await env.gate.set_plan(org, "pro")
    assert (await env.gate.charge(org, "goal_generation", user=user)).ok
    await env.sync()
    store = await env.gate.require_store()
    row = await store.pool.fetchrow(
        "SELECT user_id, tokens_deducted FROM ai_token_usage_log"
        " WHERE organization_id = $1 AND kind = 'charge'",
        org,
    )
    assert row is not None and (row["user_id"], row["tokens_deducted"]) == (user, 3)
    for shard in env.gate.keys.all_shards():
        assert await env.gate.redis.client.xlen(shard.events + ":dead") == 0


@requires_postgres
async def test_the_ledger_states_the_same_rule(env: Env) -> None:
    store = await env.gate.require_store()
    ok = "!" + "~" * (MAX_ID_LENGTH - 1)
    await store.pool.execute("INSERT INTO organizations (id, plan) VALUES ($1, 'pro')", ok)
    for bad in ["", "x" * 201, "has space", "caf\u00e9", "tab\there"]:
        with pytest.raises(asyncpg.CheckViolationError):
            await store.pool.execute("INSERT INTO organizations (id, plan) VALUES ($1, 'p')", bad)


@pytest.mark.parametrize(
    "args",
    [
        ["orgs", "set-plan", "", "pro"],
        ["orgs", "set-plan", "x" * 300, "pro"],
        ["orgs", "show", "has space"],
        ["keys", "create", "--org", "nul\x00byte"],
        ["keys", "create", "--org", "acme", "--user", "caf\u00e9"],
        ["keys", "list", "--org", ""],
        ["grant", "x" * 201, "--bucket", "goal_generation", "--amount", "5"],
    ],
    ids=lambda a: " ".join(a)[:30],
)
def test_the_cli_refuses_bad_ids_with_exit_code_2(args: list[str], tmp_path: Path) -> None:
    # Refused while reading the arguments: the config (absent here) is never even loaded.
    config = tmp_path / "absent.yaml"
    result = CliRunner().invoke(main, [*args, "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "printable ASCII characters without spaces" in result.output

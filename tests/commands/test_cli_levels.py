"""``creditgate teams|users|keys`` with teams and caps (contract A10), run as a user runs
them (subprocesses) on the real Redis and a throwaway Postgres: each change lands in the
ledger and in the org's Redis mirror, which the next charge obeys; mistakes are one line
and exit 1, and leave nothing half made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg

from gateway.config import load_config
from gateway.core.caps import cap_field, membership_field
from gateway.metering.gate import CreditGate
from tests.commands.test_cli import cli, config_file  # noqa: F401  (the fixture)

BUCKET = "goal_generation"  # cost 3 in the reference config; pro allocates 20


def _json(proc: Any) -> Any:
    return json.loads(proc.stdout)


def _refused(*args: str, config: Path, says: str) -> None:
    proc = cli(*args, config=config, check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


async def _mirror(gate: CreditGate, *fields: str) -> list[str | None]:
    raw = await gate.redis.client.hmget(gate.keys.org("acme"), list(fields))
    return [None if v is None else (v.decode() if isinstance(v, bytes) else str(v)) for v in raw]


async def test_teams_users_and_keys_from_the_command_line(config_file: Path) -> None:  # noqa: F811
    cli("migrate", config=config_file)
    cli("orgs", "set-plan", "acme", "pro", config=config_file)
    config = load_config(config_file)
    gate = CreditGate(config)
    db = await asyncpg.connect(config.database_url)
    try:
        # A team with a name and a percentage cap.
        made = _json(cli("teams", "set", "acme", "red", "--name", "Red team",
                         "--cap", f"{BUCKET}=50%", config=config_file))  # fmt: skip
        assert made == {"org": "acme", "team": "red", "name": "Red team",
                        "caps": {BUCKET: "50%"}, "created": True}  # fmt: skip
        assert await _mirror(gate, cap_field(BUCKET, "team", "red")) == ["p5000"]
        listed = cli("teams", "list", "acme", config=config_file).stdout
        assert listed.strip() == f"red  name='Red team'  caps={BUCKET}=50%  users=0  keys=0"

        # A user in it with a cap of its own.
        user = _json(cli("users", "set", "acme", "alice", "--team", "red",
                         "--cap", f"{BUCKET}=6", config=config_file))  # fmt: skip
        assert user == {"org": "acme", "user": "alice", "team": "red", "caps": {BUCKET: 6}}
        assert await _mirror(
            gate, membership_field("user", "alice"), cap_field(BUCKET, "user", "alice")
        ) == ["red", "6"]  # fmt: skip

        # A key created in the team, capped at one request's cost: the mirror is charged.
        made_key = cli("keys", "create", "--org", "acme", "--user", "bob", "--team", "red",
                       "--cap", f"{BUCKET}=3", config=config_file)  # fmt: skip
        kid = made_key.stderr.split("id:")[1].split()[0]
        assert made_key.stdout.strip().startswith("cg_")
        row = await db.fetchrow("SELECT team_id, caps FROM api_keys WHERE id = $1", kid)
        assert row is not None
        assert row["team_id"] == "red" and json.loads(row["caps"]) == {BUCKET: 3}
        assert (await gate.charge("acme", BUCKET, user="bob", key_id=kid)).ok
        refused = await gate.charge("acme", BUCKET, user="bob", key_id=kid)
        assert not refused.ok and refused.level == "key"

        # keys set: out of the team, cap cleared; the next charge goes through.
        moved = _json(cli("keys", "set", kid, "--no-team", "--clear-cap", BUCKET,
                          config=config_file))  # fmt: skip
        assert (moved["team"], moved["caps"]) == (None, {})
        assert await _mirror(
            gate, membership_field("key", kid), cap_field(BUCKET, "key", kid)
        ) == [None, None]  # fmt: skip
        assert (await gate.charge("acme", BUCKET, user="bob", key_id=kid)).ok
        cleared = _json(cli("teams", "set", "acme", "red", "--clear-cap", BUCKET,
                            config=config_file))  # fmt: skip
        assert (cleared["name"], cleared["caps"], cleared["created"]) == ("Red team", {}, False)

        # Mistakes: one line, exit 1, nothing changed or half made.
        keys_before = await db.fetchval("SELECT count(*) FROM api_keys")
        _refused("teams", "set", "nowhere", "red", config=config_file, says="unknown org")
        _refused("users", "set", "acme", "alice", "--team", "blue", config=config_file,
                 says="no team 'blue'")  # fmt: skip
        _refused("teams", "set", "acme", "red", "--cap", f"{BUCKET}=lots", config=config_file,
                 says="a cap is a number")  # fmt: skip
        _refused("teams", "set", "acme", "red", "--cap", "nope=5", config=config_file,
                 says="unknown bucket 'nope'")  # fmt: skip
        _refused("keys", "create", "--org", "acme", "--team", "blue", config=config_file,
                 says="no team 'blue'")  # fmt: skip
        _refused("keys", "set", "key_missing", "--team", "red", config=config_file,
                 says="no API key")  # fmt: skip
        assert await db.fetchval("SELECT count(*) FROM api_keys") == keys_before
        both = cli("users", "set", "acme", "alice", "--team", "red", "--no-team",
                   config=config_file, check=False)  # fmt: skip
        assert both.returncode == 2 and "exclude each other" in both.stderr

        # Deleting the team leaves alice teamless, in the ledger and in the mirror.
        out = cli("teams", "delete", "acme", "red", config=config_file).stdout
        assert "deleted team red of acme (1 users" in out
        assert await db.fetchval(
            "SELECT team_id FROM org_users WHERE organization_id = 'acme' AND user_id = 'alice'"
        ) is None  # fmt: skip
        assert await _mirror(gate, membership_field("user", "alice")) == [None]
        assert cli("teams", "list", "acme", config=config_file).stdout == ""
        _refused("teams", "delete", "acme", "red", config=config_file, says="no team 'red'")
    finally:
        await db.close()
        await gate.close()

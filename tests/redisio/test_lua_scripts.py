"""The Lua script loader (gateway/redisio/lua_scripts.py): the shared prelude is prepended
where it is used, without moving a line; Redis computes the SHA the loader does; NOSCRIPT
recovery sends the assembled source; and the prelude writes the event format of
gateway/core/events.py. Destructive steps (SCRIPT FLUSH) run on a private redis-server,
ports 7160-7169."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core.events import FIELDS, LEVELS_FIELD, TEAM_FIELD, USAGE_FIELDS
from gateway.redisio.connect import connect_redis
from gateway.redisio.lua_scripts import SCRIPT_NAMES, assemble, load, prelude_code
from gateway.redisio.pipelined import RedisReplyError
from tests.support.redis_servers import RedisServer, free_ports, start_redis

LUA = Path(__file__).resolve().parents[2] / "lua"
WRITES_EVENTS = {"charge", "settle", "set_plan", "grant", "sweep_holds", "repair"}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with start_redis(free_ports(1, 7160, 7169)[0]) as srv:
        yield srv


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_the_prelude_goes_where_it_is_used_and_moves_no_line(name: str) -> None:
    text = (LUA / f"{name}.lua").read_text()
    script = load(name)
    assert script.sha == hashlib.sha1(script.source.encode()).hexdigest()
    if name in WRITES_EVENTS:
        # One line in front of the script's first: line N of the file is line N in Redis.
        assert script.source == f"{prelude_code()} {text}"
        assert script.source.splitlines()[1:] == text.splitlines()[1:]
        assert "XADD" not in text  # the event is written by the prelude alone
    else:
        assert script.source == text


def test_prelude_code_is_one_line_without_comments() -> None:
    code = prelude_code()
    assert "\n" not in code and "--" not in code
    assert code.startswith("local function audit_event(stream_key,") and code.endswith("end")


def test_the_prelude_writes_the_event_format_in_order() -> None:
    params = re.search(r"audit_event\(stream_key, ([^)]*)\)", prelude_code())
    v2, *xadds = prelude_code().split("'XADD', stream_key, '*',")[1:]
    assert params is not None and len(xadds) == 6
    # v2 (events.PACKED_FIELD): the values joined by tabs, in the parameters' order.
    assert v2.startswith(" 'v2', v)")
    packed = re.findall(
        r"(?:v = v \.\. '\\t' \.\. |local v = |'\\t' \.\. )\(?(\w+)", prelude_code()
    )
    assert tuple(packed) == (*FIELDS, *USAGE_FIELDS, TEAM_FIELD, LEVELS_FIELD, TEAM_FIELD)
    # The fields, then the optional usage fields (events.USAGE_FIELDS) of some request
    # events, then the optional team (contract A10), then the optional capped levels'
    # figures (after the team, then always written): one v1 XADD per combination.
    assert tuple(params.group(1).split(", ")) == (
        *FIELDS, *USAGE_FIELDS, TEAM_FIELD, LEVELS_FIELD,
    )  # fmt: skip
    shapes = (
        (*FIELDS, TEAM_FIELD, LEVELS_FIELD),
        (*FIELDS, *USAGE_FIELDS, TEAM_FIELD, LEVELS_FIELD),
        FIELDS,
        (*FIELDS, TEAM_FIELD),
        FIELDS + USAGE_FIELDS,
        (*FIELDS, *USAGE_FIELDS, TEAM_FIELD),
    )
    for xadd, fields in zip(xadds, shapes, strict=True):
        names = re.findall(r"'(\w+)', (\w+)", xadd.split(")", 1)[0])
        assert names == [(field, field) for field in fields]  # 'id', id, 'k', k, ...


async def test_redis_computes_the_loaders_sha_and_noscript_sends_the_assembled_source(
    server: RedisServer,
) -> None:
    for fast in (True, False):
        handles = connect_redis(server.url, fast=fast)
        try:
            await handles.client.script_flush()
            key = f"cgt{uuid.uuid4().hex[:8]}:{{s0}}:org:acme"
            events = f"cgt{uuid.uuid4().hex[:8]}:{{s0}}:events"
            # grant.lua on an org without state: NOSCRIPT first, then the loaded script.
            reply = await handles.runner.run(
                load("grant"), [key, events], [1, "acme", "b", 5, 0, "ref"]
            )
            assert reply == ["missing"]
            for name in SCRIPT_NAMES:
                assert await handles.client.script_load(load(name).source) == load(name).sha
        finally:
            await handles.close()


async def test_error_line_numbers_are_the_files(server: RedisServer) -> None:
    broken = assemble("broken", "-- broken.lua\nif false then audit_event() end\n\nerror('boom')\n")
    assert broken.source.startswith(prelude_code())
    handles = connect_redis(server.url)
    try:
        with pytest.raises(RedisReplyError, match=r"user_script:4: boom"):
            await handles.runner.run(broken, ["k"], [])
    finally:
        await handles.close()

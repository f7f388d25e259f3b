"""RESP encoding for the hot path (gateway/redisio/resp.py): an ArgTemplate filled in gives
the bytes hiredis packs for the same arguments, ASCII or not; encoded runs decode back;
and every runner's run_encoded answers as run does, on a real Redis (NOSCRIPT included)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from gateway.redisio.connect import connect_redis
from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.resp import (
    SLOT,
    ArgTemplate,
    ScriptArg,
    decode_args,
    encode_args,
    evalsha_header,
    pack_command,
)
from tests.support import services


def packed_args(args: list[ScriptArg]) -> bytes:
    """What hiredis makes of ``args``, without the array header."""
    packed = pack_command(tuple(args))
    return packed[packed.index(b"\r\n") + 2 :]


@pytest.mark.parametrize(
    ("parts", "values"),
    [
        (["a", SLOT, "b", 3, SLOT], ("x", "1234567")),
        ([SLOT, SLOT, SLOT, SLOT, SLOT], ("1", "", "22", "333", "4444")),
        ([SLOT] * 7, tuple("abcdefg")),  # past the spelled-out interleavers
        (["no slots", 1, b"raw"], ()),
        (["100%", "%s", "%%d", SLOT], ("50%",)),  # % in constants and values
        (["acmé", SLOT, "{s1}"], ("rid",)),  # non-ASCII constant: the exact path
        (["acme", SLOT], ("ключ",)),  # non-ASCII value: the exact path
        (["bytes \xff", SLOT], ("\udcff",)),  # surrogate-escaped byte, as from a header
    ],
)
def test_template_fill_is_what_hiredis_packs(parts: list[Any], values: tuple[str, ...]) -> None:
    template = ArgTemplate(parts)
    filled = iter(values)
    args = [next(filled) if p is SLOT else p for p in parts]
    assert template.count == len(parts) and template.slots == len(values)
    expected = packed_args(
        [a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a for a in args]
    )
    assert template.fill(values) == expected
    assert decode_args(template.fill(values)) == decode_args(expected)


def test_template_takes_exactly_its_slots() -> None:
    for template in (ArgTemplate(["a", SLOT, SLOT]), ArgTemplate([SLOT] * 7)):
        with pytest.raises(ValueError):
            template.fill(("x",))
    with pytest.raises(ValueError):
        ArgTemplate(["é", SLOT]).fill(("x", "y"))  # the exact path checks too


def test_decode_args_round_trip_and_garbage() -> None:
    args: list[ScriptArg] = ["a", "", 12, b"\x00\xff", "é"]
    encoded = encode_args(args)
    assert decode_args(encoded) == [b"a", b"", b"12", b"\x00\xff", "é".encode()]
    assert decode_args(encoded, 2) == [b"a", b""]
    with pytest.raises(ValueError, match="6 expected"):
        decode_args(encoded, 6)
    with pytest.raises(ValueError):
        decode_args(b":12\r\n")  # an integer reply is not an argument
    assert evalsha_header("abc", 2) + encode_args(["1", "k"]) == pack_command(
        ("EVALSHA", "abc", "1", "k")
    )


@pytest.mark.parametrize("fast", [True, False], ids=["pipelined", "redis-py"])
async def test_run_encoded_answers_as_run_does(fast: bool) -> None:
    # A unique script: the first call meets NOSCRIPT and loads it.
    echo = LuaScript.from_source(
        "echo", f"-- {uuid.uuid4().hex}\nreturn {{KEYS[1], ARGV[1], ARGV[2], #ARGV}}"
    )
    key = f"cgt{uuid.uuid4().hex[:8]}:é"
    handles = connect_redis(services.redis_url(), fast=fast)
    try:
        template = ArgTemplate(["1", key, SLOT, "const"])
        plain = await handles.runner.run(echo, [key], ["v1", "const"])
        encoded = await handles.runner.run_encoded(echo, template.count, template.fill(("v1",)))
        again = await handles.runner.run_encoded(echo, template.count, template.fill(("v1",)))
        assert plain == encoded == again == [key, "v1", "const", 2]
    finally:
        await handles.close()

"""The pipelined script runner (gateway/redisio/pipelined.py) against real, throwaway redis-servers.

Behaviour that callers rely on is checked for both runners ("fast" = FastRedis,
"redispy" = RedisPyRunner), so the gateway sees the same results and exception types.
Ports 7100-7109 (single servers).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gateway.core.errors import RedisUnavailable
from gateway.redisio.connect import RedisHandles, connect_redis
from gateway.redisio.link import ErrorReply
from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.pipelined import ConnectionSettings, FastRedis, RedisReplyError, reply_error
from gateway.redisio.resp import encode_args
from tests.support.redis_servers import RedisServer, free_ports, start_redis

RUNNERS = ["fast", "redispy"]


def script(body: str) -> LuaScript:
    """A script with a unique SHA, so no server has it cached yet."""
    return LuaScript.from_source("t", f"-- {uuid.uuid4().hex}\n{body}")


ECHO = script(
    "if ARGV[1] == 'err' then return redis.error_reply('ERR boom') end\n"
    "return {ARGV[1], redis.call('INCR', KEYS[1])}"
)
INCR = script("return redis.call('INCR', KEYS[1])")
# KEYS[1] is unique per call, KEYS[2] counts every execution.
ONCE = script("return {redis.call('INCR', KEYS[1]), redis.call('INCR', KEYS[2])}")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with start_redis(free_ports(1, 7100, 7109)[0]) as srv:
        yield srv


@pytest.fixture
async def handles(request: pytest.FixtureRequest, server: RedisServer) -> AsyncIterator[Any]:
    h = connect_redis(server.url, fast=getattr(request, "param", "fast") == "fast")
    yield h
    await h.close()


def fast(h: RedisHandles) -> FastRedis:
    assert isinstance(h.runner, FastRedis)
    return h.runner


@pytest.mark.parametrize("runner", RUNNERS)
async def test_concurrent_calls_get_their_own_replies(server: RedisServer, runner: str) -> None:
    # 2,000 calls share redis-py's 100 pooled sockets; on a loaded machine the last of them
    # can wait past the default 2 s for a socket ("No connection available"). This test is
    # about each call getting its own reply, not about that wait, so it allows 30 s.
    handles = connect_redis(server.url, fast=runner == "fast", timeout=30.0)
    args = [str(i) if i % 7 else "err" for i in range(2000)]
    try:
        results = await asyncio.gather(
            *(handles.runner.run(ECHO, ["cnt"], [a]) for a in args), return_exceptions=True
        )
    finally:
        await handles.close()
    counters = []
    for arg, result in zip(args, results, strict=True):
        if arg == "err":
            assert isinstance(result, RedisReplyError) and "boom" in str(result)
        else:
            assert isinstance(result, list) and result[0] == arg
            counters.append(result[1])
    # Each successful call ran exactly once; one pipelined socket also keeps issue order.
    expected = list(range(1, len(counters) + 1))
    assert (counters if isinstance(handles.runner, FastRedis) else sorted(counters)) == expected


class CountingTransport:
    """Wraps a transport to count write() calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_one_tick_few_writes(handles: RedisHandles) -> None:
    runner = fast(handles)
    await runner.run(INCR, ["warm"], [])
    proto = runner.links[0].protocol
    assert proto is not None
    counting = CountingTransport(proto.transport)
    proto.transport = counting  # type: ignore[assignment]
    results = await asyncio.gather(*(runner.run(INCR, ["k"], []) for _ in range(500)))
    assert sorted(results) == list(range(1, 501))
    # 500 commands of one tick: early writes after 2, 4, 8, 16 and then every 16 more
    # (Redis starts on the first while the rest are queued), the last 6 at the tick's end.
    assert counting.writes == 4 + (500 - 30) // 16 + 1 == 34
    for _ in range(3):  # awaited one by one: one write each, nothing held back
        await runner.run(INCR, ["k"], [])
    assert counting.writes == 37
    one = await asyncio.gather(runner.run(INCR, ["k"], []))
    assert one == [504] and counting.writes == 38


@pytest.mark.parametrize("handles", RUNNERS, indirect=True)
async def test_noscript_recovery_runs_the_script_once(
    handles: RedisHandles, server: RedisServer
) -> None:
    # Fresh server: the first call already goes through NOSCRIPT.
    assert await handles.runner.run(INCR, ["a"], []) == 1
    with server.client() as admin:
        admin.script_flush()
        assert await handles.runner.run(INCR, ["a"], []) == 2
        assert admin.get("a") == "2"
        admin.script_flush()
        loads = script_loads(admin)
        results = await asyncio.gather(*(handles.runner.run(INCR, ["b"], []) for _ in range(50)))
        assert sorted(results) == list(range(1, 51))
        assert admin.get("b") == "50"
        assert admin.script_exists(INCR.sha) == [True]
        if isinstance(handles.runner, FastRedis):  # 50 calls hit NOSCRIPT, one sent the source
            assert script_loads(admin) - loads == 1


async def test_send_encoded_hands_back_the_reply_future_and_recover_encoded_follows_run_encoded(
    handles: RedisHandles, server: RedisServer
) -> None:
    """``send_encoded`` (what ``Admitter.admit`` awaits) is the reply's future itself on a
    live socket, answering error replies as they come; ``recover_encoded`` then does what
    ``run_encoded`` does after them: NOSCRIPT loaded once and run, other errors raised."""
    runner = fast(handles)
    counter = script("return redis.call('INCR', KEYS[1])")
    encoded = encode_args(["1", "k"])
    # Not yet connected: an awaitable that connects first; a fresh server: NOSCRIPT.
    reply = await runner.send_encoded(counter, 2, encoded)
    assert isinstance(reply, ErrorReply) and str(reply).startswith("NOSCRIPT")
    assert await runner.recover_encoded(counter, 2, encoded, reply) == 1
    pending = runner.send_encoded(counter, 2, encoded)
    assert isinstance(pending, asyncio.Future)  # no coroutine of its own on a live socket
    assert await pending == 2
    with server.client() as admin:
        admin.script_flush()
        reply = await runner.send_encoded(counter, 2, encoded)
        assert isinstance(reply, ErrorReply)
        assert await runner.recover_encoded(counter, 2, encoded, reply) == 3
        assert admin.get("k") == "3"  # the call that met NOSCRIPT ran once, after the load
    failing = script("redis.call('INCR', KEYS[1]); return redis.error_reply('ERR nope')")
    reply = await runner.send_encoded(failing, 2, encode_args(["1", "f"]))
    assert isinstance(reply, ErrorReply) and str(reply).startswith("NOSCRIPT")
    with pytest.raises(RedisReplyError, match="nope"):
        await runner.recover_encoded(failing, 2, encode_args(["1", "f"]), reply)
    with server.client() as admin:
        assert admin.get("f") == "1"  # loaded and run once, its error not retried


def script_loads(admin: Any) -> int:
    return int(admin.info("commandstats").get("cmdstat_script|load", {}).get("calls", 0))


@pytest.mark.parametrize("handles", RUNNERS, indirect=True)
async def test_script_error_is_not_retried(handles: RedisHandles, server: RedisServer) -> None:
    failing = script("redis.call('INCR', KEYS[1]); return redis.error_reply('ERR nope')")
    with pytest.raises(RedisReplyError, match="nope"):
        await handles.runner.run(failing, ["f"], [])
    with server.client() as admin:
        admin.set("s", "text")
        with pytest.raises(RedisReplyError, match="WRONGTYPE"):
            await handles.runner.run(script("return redis.call('HGET', KEYS[1], 'x')"), ["s"], [])
        assert admin.get("f") == "1"


def test_reply_error_classification() -> None:
    for message in ("CLUSTERDOWN The cluster is down", "LOADING loading", "BUSY script", "OOM x"):
        assert isinstance(reply_error(message), RedisUnavailable)
    error = reply_error("WRONGTYPE Operation against a key")
    assert isinstance(error, RedisReplyError) and error.code == "WRONGTYPE"


@pytest.mark.parametrize("kind", RUNNERS)
async def test_server_killed_mid_traffic(kind: str) -> None:
    # AOF with fsync on every write: whatever Redis acknowledged survives the SIGKILL.
    port = free_ports(1, 7100, 7109)[0]
    with start_redis(port, args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        handles = connect_redis(server.url, timeout=1.0, fast=kind == "fast")
        runner = handles.runner
        succeeded: list[str] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def worker(n: int) -> None:
            i = 0
            while not stop.is_set():
                call_id = f"id:{n}:{i}"
                i += 1
                try:
                    await runner.run(ONCE, [call_id, "total"], [])
                    succeeded.append(call_id)
                except Exception as exc:
                    failures.append(exc)
                    await asyncio.sleep(0.005)

        workers = [asyncio.create_task(worker(n)) for n in range(40)]
        # Wait for real traffic (a fixed sleep is too short on a loaded machine).
        deadline = time.monotonic() + 10
        while len(succeeded) < 20 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        before_kill = len(succeeded)
        attempts = runner.connect_attempts if isinstance(runner, FastRedis) else 0
        server.kill()
        await asyncio.sleep(0.6)
        if isinstance(runner, FastRedis):
            attempts = runner.connect_attempts - attempts
        stop.set()
        await asyncio.gather(*workers)
        assert before_kill > 0 and failures
        assert all(isinstance(exc, RedisUnavailable) for exc in failures), failures[:3]
        if isinstance(runner, FastRedis):
            # 0.6 s down with 40 busy callers: the backoff allows one attempt per 0.2 s.
            assert attempts <= 0.6 / runner.settings.backoff + 2, attempts

        await asyncio.to_thread(server.restart)
        # Same client, not re-created: it may still be in its connect backoff for a moment.
        after = None
        for _ in range(50):
            try:
                after = await runner.run(ONCE, ["after", "total"], [])
                break
            except RedisUnavailable:
                await asyncio.sleep(0.02)
        await handles.close()
        with server.client() as admin:
            ids = [key for key in admin.scan_iter("id:*")]
            values = admin.mget(ids) if ids else []
            total = int(admin.get("total") or 0)
        # No call ran twice; every acknowledged call ran; the counter matches the calls that ran
        # (acknowledged or not, plus the "after" call).
        assert set(values) <= {"1"}
        assert set(succeeded) <= set(ids)
        assert total == len(ids) + 1
        assert after == [1, total]


@pytest.mark.parametrize("kind", RUNNERS)
async def test_timeout_then_recovery(kind: str, server: RedisServer) -> None:
    handles = connect_redis(server.url, timeout=0.3, fast=kind == "fast")
    runner = handles.runner
    assert await runner.run(INCR, ["t"], []) == 1
    with server.client() as admin:
        admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
    started = time.monotonic()
    results = await asyncio.gather(
        *(runner.run(ECHO, ["t2"], [str(i)]) for i in range(10)), return_exceptions=True
    )
    elapsed = time.monotonic() - started
    assert all(isinstance(r, RedisUnavailable) for r in results), results
    assert 0.25 < elapsed < 0.8
    await asyncio.sleep(max(0.0, 1.1 - (time.monotonic() - started)))
    # Recovered, and no late reply from before is handed to a new call.
    results = await asyncio.gather(*(runner.run(ECHO, ["t3"], [str(i)]) for i in range(20)))
    assert [r[0] for r in results] == [str(i) for i in range(20)]
    await handles.close()


async def test_connect_backoff_fails_fast() -> None:
    port = free_ports(1, 7100, 7109)[0]  # nothing listens there
    runner = FastRedis("127.0.0.1", port, settings=ConnectionSettings(backoff=0.5))
    with pytest.raises(RedisUnavailable, match="cannot connect"):
        await runner.run(INCR, ["x"], [])
    started = time.monotonic()
    for _ in range(20):
        with pytest.raises(RedisUnavailable, match="not retrying"):
            await runner.run(INCR, ["x"], [])
    assert time.monotonic() - started < 0.2  # no connect attempt, no waiting
    assert runner.connect_attempts == 1
    await asyncio.sleep(runner.settings.backoff + 0.02)
    with start_redis(port):
        assert await runner.run(INCR, ["x"], []) == 1
        assert runner.connect_attempts == 2
        await runner.close()


async def test_reconnects_after_connection_drop(handles: RedisHandles, server: RedisServer) -> None:
    runner = fast(handles)
    client_id = await runner.execute("CLIENT", "ID")
    with server.client() as admin:
        admin.client_kill_filter(_id=client_id)
    await asyncio.sleep(0.05)  # let the loop see the EOF
    assert await runner.run(INCR, ["r"], []) == 1
    assert await runner.execute("CLIENT", "ID") != client_id
    assert runner.connect_attempts == 2


def test_handles_built_outside_a_loop_work_in_each_new_loop(server: RedisServer) -> None:
    handles = connect_redis(server.url)  # no running loop here: nothing may connect yet

    async def use() -> Any:
        result = await handles.runner.run(INCR, ["l"], [])
        await handles.close()
        return result

    assert asyncio.run(use()) == 1
    assert asyncio.run(use()) == 2  # a later loop (e.g. after a test's loop) works too


async def test_garbage_from_server_is_unavailable() -> None:
    hung_up = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        writer.write(b"%%%not resp\r\n")
        await reader.read(1000)  # until the client hangs up
        writer.close()
        await writer.wait_closed()
        hung_up.set()

    tcp = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    runner = FastRedis("127.0.0.1", port)
    with pytest.raises(RedisUnavailable, match="protocol error"):
        await runner.run(INCR, ["g"], [])
    await asyncio.wait_for(hung_up.wait(), 2)  # the client closed its socket by itself
    await runner.close()
    tcp.close()
    await tcp.wait_closed()

"""Settlement: holds turned into charges or refunds, batched per shard (lua/settle.lua).

Settlement runs after the response ends, off every client's latency path. The settles of
one shard queued within ``SETTLE_WINDOW_S`` (``settle_nowait``, the middleware's) or
within one event-loop iteration (``settle``, which returns a future) go to Redis in one
script call, so the second step costs a fraction of the first. On a single Redis the
batches of every shard flushed together go in one call (settle.lua's multi-shard form,
``multi_shard``): with many orgs a window holds a few settles of each of many shards, and
a call per shard cost Redis ~22-27 k instructions more each (BENCHMARKS.md section 1,
"Round 7"). Each shard's batch is settled in that call exactly as a call of its own would
settle it, under its own ``pcall``: one failing leaves the others settled.

A settle may carry an :class:`Actual` (contract A8: the call's real cost, read after the
response): settle.lua then charges that instead of the hold, refunding the difference or
taking it from what is left, and records what cannot be covered as overage (recorded,
never owed: no balance goes below zero, and the org's next requests are admitted by its
balance as usual). It may also carry the :class:`~gateway.metering.admission.StoredResponse`
a repeat of the request's Idempotency-Key gets back (contract A9). Settles with neither
are the fixed-cost path: the same 4 values per item as before either existed.

Durable settles (``settle_wait_replicas``, off by default): a settle acknowledged by a
Redis master that dies before replicating it is lost in the failover, and its hold comes
back on the promoted replica to expire into a charge at its reserve (a refund lost, an
actual cost replaced by the reserve). With the option each batch is followed by ``WAIT``
on the same socket and sent again until enough replicas acknowledge it (up to
``_DURABLE_FOR_S``): settling is idempotent (a hold already settled is ``gone``), so on the
master that ran it the resend changes nothing, and on a promoted replica that lacked it the
resend settles the hold that came back. The callers' futures get the first reply, at once:
only the confirmation waits. A resend that ran on another node than the first send (the
promoted replica, after a failover) ends the batch too: the settle is then on the master
that survived, which may have no replica of its own to confirm it until the old master
returns. WAIT blocks its socket, so the settles get connections of
their own (a second runner) and hot-path charges never queue behind a WAIT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from gateway.core.errors import RedisUnavailable
from gateway.core.redis_keys import KeySpace, ShardKeys
from gateway.metering.admission import Admission, StoredResponse
from gateway.redisio.connect import RedisHandles, ScriptRunner, connect_redis
from gateway.redisio.lua_scripts import LuaScript, load
from gateway.redisio.pipelined import RedisReplyError
from gateway.usage.model import Usage

__all__ = [
    "COST_SOURCES",
    "SETTLE_WINDOW_S",
    "Actual",
    "Settled",
    "Settlement",
    "counts_value",
    "encode_fixed",
    "encode_group",
    "encode_many",
    "encode_single",
    "extension",
    "quiet_extension",
    "shard_head",
]

COST_SOURCES = ("usage", "header", "app", "policy", "reservation")


class Actual:
    """What a call really cost, known after its response (contract A8).

    Immutable (``Final``: mypy refuses an assignment; ``__slots__``: no other attribute).
    Not a frozen dataclass: one is built for every variable-cost request, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) costs 8.6 k instructions
    against 3.5 k for this one (bench/usage_instructions.py, BENCHMARKS.md issue 8).
    """

    __slots__ = ("missing", "source", "tokens", "usage")

    def __init__(
        self, tokens: int, usage: Usage | None = None, missing: bool = False, source: str = "usage"
    ) -> None:
        self.tokens: Final = tokens
        """What the call really cost, already capped by the feature's max."""
        self.usage: Final = usage
        """Model and counts read from the response, None if none."""
        self.missing: Final = missing
        """Usage never came; ``tokens`` was decided by on_missing_usage."""
        self.source: Final = source
        """usage | header | app | policy | reservation (the event's ``cs``)."""

    def _key(self) -> tuple[int, Usage | None, bool, str]:
        return self.tokens, self.usage, self.missing, self.source

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Actual) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Actual(tokens={self.tokens!r}, usage={self.usage!r}, missing={self.missing!r}, "
            f"source={self.source!r})"
        )


@dataclass(frozen=True, slots=True)
class Settled:
    """What settling one hold with an :class:`Actual` did.

    ``charged + overage`` is the actual (0 for a refund); ``charged`` is the net tokens
    taken from the balance (the event's ``t``); ``refunded`` the tokens of the hold given
    back (the whole hold on a refund). ``gone``: the hold no longer existed (settled
    already, or swept into an expired_hold charge); nothing was done, every count is 0.
    """

    charged: int
    refunded: int
    overage: int
    remaining: int | None
    reserved: int
    gone: bool = False


GONE = Settled(0, 0, 0, None, 0, gone=True)


def usage_value(actual: Actual | None, source: str | None = None) -> str:
    """An extended settle item's usage value (lua/settle.lua): the actual and the event's
    usage fields in one string, ``"<actual> <cs> <um> <ui> <uc> <uo> <ur> <mdl>"``, the
    model last (it may hold spaces); ``""`` without an actual. ``source`` replaces the
    actual's (a reservation's)."""
    if actual is None:
        return ""
    cs = actual.source if source is None else source
    um = "1" if actual.missing else ""
    u = actual.usage
    if u is None:
        return f"{max(0, int(actual.tokens))} {cs} {um}     "
    return (
        f"{max(0, int(actual.tokens))} {cs} {um} {u.input_tokens} {u.cached_input_tokens} "
        f"{u.output_tokens} {u.reasoning_tokens} {'' if u.model is None else u.model}"
    )


def counts_value(
    tokens: int,
    model: str | None,
    input_tokens: int,
    cached_input_tokens: int,
    output_tokens: int,
    reasoning_tokens: int,
) -> str:
    """:func:`usage_value` of the actual ``tokens`` read from a usage (source ``usage``, not
    missing), given by the usage's model and counts: what the usage tap queues for a
    complete answer, which it prices without building a ``Usage`` or an :class:`Actual`."""
    return (
        f"{tokens} usage  {input_tokens} {cached_input_tokens} {output_tokens} "
        f"{reasoning_tokens} {'' if model is None else model}"
    )


def extension(
    actual: Actual | None, response: StoredResponse | None, reservation_org: str = ""
) -> tuple[str, ...]:
    """An extended settle item's 3 values after the 4 of every item (lua/settle.lua):
    its reply is what :func:`settled_of` reads."""
    return (usage_value(actual), "" if response is None else response.encode(), reservation_org)


def quiet_extension(actual: Actual) -> tuple[str]:
    """The 1 value of a settle item charging ``actual`` whose reply nobody reads and with
    no response to keep (lua/settle.lua outcome ``a``: the middleware's settle of a
    variable cost): two values fewer to send and parse, and an integer reply instead of an
    array."""
    return (usage_value(actual),)


def settled_of(reply: Any) -> Settled:
    """An extended item's reply as a :class:`Settled`."""
    if not isinstance(reply, list):
        return GONE
    charged, refunded, overage, remaining, reserved = (int(v) for v in reply)
    return Settled(charged, refunded, overage, remaining, reserved)


def _extended_outcome(ok: bool, ext: tuple[str, ...]) -> str:
    """The outcome of an extended item (lua/settle.lua): "C" | "R" with the 3 values of
    :func:`extension`, "a" with the 1 of :func:`quiet_extension` (a charge only)."""
    if len(ext) > 1:
        return "C" if ok else "R"
    if not ok:
        raise ValueError("a quiet_extension charges its actual: queue a refund without it")
    return "a"


log = logging.getLogger("creditgate.meter")

# Settles per script call; large batches keep Redis busy in one go for too long.
_BATCH = 256
# How long fire-and-forget settles (settle_nowait) are collected before they go to Redis.
# Each script call costs a fixed ~5 µs of Redis CPU and ~10 µs of ours; with many orgs
# spread over the shards, one loop iteration holds about one settle per shard, so a short
# window is what makes batching work. Off every client's latency path.
SETTLE_WINDOW_S = 0.002
_RETRIES = 5
# Durable settles: how long an unconfirmed batch is sent again (covers a failover with the
# default cluster-node-timeout of 15 s), and the longest pause between two sends.
_DURABLE_FOR_S = 30.0
_DURABLE_MAX_PAUSE_S = 1.0

# One queued settle: org key, idempotency key, request id, outcome ("c" charge | "r"
# refund; "C" | "R" with the 3 extension values; "a" with the 1 of quiet_extension),
# upstream status, latency, the future of settle() (None for settle_nowait), and the
# extension (None for "c" | "r"). The future gets the raw reply of the item.
_Settle = tuple[
    str, str, str, str, str, str, "asyncio.Future[Any] | None", "tuple[str, ...] | None"
]


# "$<n>\r\n", the head of a RESP bulk string of n bytes, for the lengths a settle's values
# have (a key, a request id, a status...): indexing this costs less than formatting n.
# The text of an HTTP status, without str()'s call and conversion on every settle.
_STATUS_TEXT: dict[int | None, str] = {status: str(status) for status in range(100, 600)}
_BULK = tuple(f"${n}\r\n" for n in range(256))
# An item's two keys (the org's state, its idempotency key or the shard's none) as RESP
# bulk strings, kept: most settles of an org repeat the same pair. Bounded: emptied when
# full (idempotency keys differ per request).
_KEY_TEXT: dict[tuple[str, str], str] = {}
_KEY_TEXT_MAX = 4096


def shard_head(shard: ShardKeys) -> str:
    """settle.lua's 3 shard keys as RESP bulk strings, the start of every batch's keys:
    built once per shard rather than per batch (with many orgs most batches hold one or
    two settles, and this formatting was a third of ``encode_fixed`` per batch)."""
    return "".join(f"${len(k)}\r\n{k}\r\n" for k in (shard.holds, shard.holdexp, shard.events))


def encode_group(items: list[_Settle], head: str) -> tuple[str, str, int] | None:
    """One shard's batch as settle.lua takes it, in RESP bulk strings: its keys (``head``,
    :func:`shard_head` of its shard, then 2 per item), its values (the item count, then
    each item's 4 and an extended item's extension values after them), and the count of
    those extension values. None when a value is not ASCII (a length written here would not
    be a byte length) or longer than 255 (a kept response usually is): the caller packs
    those."""
    bulk, pairs = _BULK, _KEY_TEXT
    n_s = str(len(items))
    keys = [head]
    values = [f"{bulk[len(n_s)]}{n_s}\r\n"]
    key, value = keys.append, values.append
    extra = 0  # the extension values of the batch (a usage-cost settle's one)
    try:
        for org, second, rid, outcome, status, latency, _done, ext in items:
            pair = pairs.get((org, second))
            if pair is None:
                pair = f"{bulk[len(org)]}{org}\r\n{bulk[len(second)]}{second}\r\n"
                if len(pairs) >= _KEY_TEXT_MAX:
                    pairs.clear()
                pairs[(org, second)] = pair
            key(pair)
            if ext is None:
                value(
                    f"{bulk[len(rid)]}{rid}\r\n{bulk[len(outcome)]}{outcome}\r\n"
                    f"{bulk[len(status)]}{status}\r\n{bulk[len(latency)]}{latency}\r\n"
                )
            elif len(ext) == 1:
                # A usage-charged answer's quiet item: its one value in the same string.
                v = ext[0]
                value(
                    f"{bulk[len(rid)]}{rid}\r\n{bulk[len(outcome)]}{outcome}\r\n"
                    f"{bulk[len(status)]}{status}\r\n{bulk[len(latency)]}{latency}\r\n"
                    f"{bulk[len(v)]}{v}\r\n"
                )
                extra += 1
            else:
                value(
                    f"{bulk[len(rid)]}{rid}\r\n{bulk[len(outcome)]}{outcome}\r\n"
                    f"{bulk[len(status)]}{status}\r\n{bulk[len(latency)]}{latency}\r\n"
                )
                extra += len(ext)
                for v in ext:
                    value(f"{bulk[len(v)]}{v}\r\n")
    except IndexError:  # a value of 256 characters or more (a kept response, a long model)
        return None
    key_text, value_text = "".join(keys), "".join(values)
    if not (key_text.isascii() and value_text.isascii()):
        return None
    return key_text, value_text, extra


def encode_fixed(
    shard: ShardKeys, items: list[_Settle], now: int, head: str | None = None
) -> tuple[int, bytes] | None:
    """settle.lua's keys and arguments for a batch of fixed-cost items, as ``run_encoded``
    takes them (the count, the RESP bulk strings), built as one string: hiredis'
    ``pack_command`` of the same ~6 arguments per item, with the lists it is given, cost
    ~10 k instructions per request, this ~4.3 k (callgrind, batches of 64). An extended item
    (``ext``: a usage-cost settle's actual, a kept response) has its values written after
    its 4. None when a value is not ASCII or longer than 255 (:func:`encode_group`).
    ``head``: :func:`shard_head` of ``shard``, if the caller keeps it.
    """
    group = encode_group(items, shard_head(shard) if head is None else head)
    if group is None:
        return None
    return encode_single(group, len(items), now)


def encode_single(group: tuple[str, str, int], n: int, now: int) -> tuple[int, bytes]:
    """settle.lua's single form for one group of :func:`encode_group` of ``n`` items."""
    keys, values, extra = group
    bulk = _BULK
    count, now_s = str(3 + 2 * n), str(now)
    text = f"{bulk[len(count)]}{count}\r\n{keys}{bulk[len(now_s)]}{now_s}\r\n{values}"
    return 6 + 6 * n + extra, text.encode()


def encode_many(groups: list[tuple[tuple[str, str, int], int]], now: int) -> tuple[int, bytes]:
    """settle.lua's multi-shard form (lua/settle.lua's header): several shards' batches,
    each one :func:`encode_group` with its item count, in one call. Only for a single Redis
    server: the keys of several shards are in several cluster slots."""
    bulk = _BULK
    nkeys, count = 0, 3  # numkeys, now and "*"
    keys, values = [], []
    for (key_text, value_text, extra), n in groups:
        nkeys += 3 + 2 * n
        count += 4 + 6 * n + extra  # 3 + 2n keys, the count n, 4n values and the extension
        keys.append(key_text)
        values.append(value_text)
    nkeys_s, now_s = str(nkeys), str(now)
    text = (
        f"{bulk[len(nkeys_s)]}{nkeys_s}\r\n{''.join(keys)}"
        f"{bulk[len(now_s)]}{now_s}\r\n$1\r\n*\r\n{''.join(values)}"
    )
    return count, text.encode()


def _encode_call(groups: list[tuple[tuple[str, str, int], int]], now: int) -> tuple[int, bytes]:
    """One settle.lua call of ``groups`` (each :func:`encode_group` with its item count):
    the single form for one, the multi-shard form for several."""
    if len(groups) == 1:
        group, n = groups[0]
        return encode_single(group, n, now)
    return encode_many(groups, now)


def _failed(shard: ShardKeys, items: list[_Settle], exc: BaseException) -> None:
    """A batch whose script answered an error: logged, and its waiting callers told."""
    log.error("settle failed for %d holds on shard %d: %s", len(items), shard.shard, exc)
    for it in items:
        done = it[6]
        if done is not None and not done.done():
            done.set_exception(exc)


class Settlement:
    """Queues settles per shard and sends each shard's queue to settle.lua in batches."""

    def __init__(
        self,
        redis: RedisHandles,
        keys: KeySpace,
        *,
        now_ms: Callable[[], int],
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        redis_url: str | None = None,
        redis_timeout: float = 2.0,
    ) -> None:
        self.redis = redis
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        # The runner settles go through: the hot path's, or with durable settles one of
        # their own (WAIT blocks the socket it is sent on; see the module docstring).
        self.runner: ScriptRunner = redis.runner
        self._own_runner: ScriptRunner | None = None
        if wait_replicas and redis_url and hasattr(redis.runner, "run_replicated"):
            self.runner = self._own_runner = connect_redis(redis_url, timeout=redis_timeout).runner
        elif wait_replicas:
            log.warning("settle_wait_replicas needs the pipelined Redis client: ignored")
            self.wait_replicas = 0
        # Durable settles: sends (and resends), those a WAIT left unconfirmed, batches that
        # ended on a promoted replica, and batches given up after _DURABLE_FOR_S (metrics,
        # tests).
        self.stats: dict[str, int] = {"sent": 0, "unconfirmed": 0, "failed_over": 0, "given_up": 0}
        self.keys = keys
        self.script = load("settle")
        self.window_s = SETTLE_WINDOW_S
        self._now_ms = now_ms
        self._shards = keys.all_shards()
        self._heads = [shard_head(shard) for shard in self._shards]  # by shard number
        self._pending: dict[int, list[_Settle]] = {}
        # The scheduled flush of _pending (None: none), its loop, and whether it waits for
        # the settle window (settle() wants its future answered at the next iteration).
        self._flush_handle: asyncio.Handle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._flush_delayed = False
        # Whether a settle queued since the last flush has a future to answer: without one
        # (the middleware's settles) a batch's replies are not walked at all.
        self._waiting = False
        self._inflight: set[asyncio.Task[None]] = set()
        # Whether several shards' batches of a flush go in one settle.lua call (its
        # multi-shard form): only on a runner whose scripts may touch keys of any shard (one
        # Redis server, ``ScriptRunner.cross_slot``), never with durable settles (their
        # resends are per shard). Tests turn it off to exercise the per-shard calls.
        self.multi_shard = not self.wait_replicas and getattr(self.runner, "cross_slot", False)

    def queue(
        self,
        adm: Admission,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None,
        done: asyncio.Future[Any] | None,
        ext: tuple[str, ...] | None = None,
    ) -> None:
        """Queue the hold of ``adm`` for charge (``ok``) or refund; ``done``, if given,
        gets settle.lua's reply for it: the tokens charged (-1 if the hold was already
        gone), or with ``ext`` (:func:`extension`) what lua/settle.lua says of an
        extended item; with a :func:`quiet_extension` (``ok`` only) the tokens charged.

        Must be called from a coroutine on the event loop the meter runs on.
        """
        org = adm.org
        keys = self.keys
        org_keys = keys.cached_org(org) or keys.of_org(org)
        item: _Settle = (
            org_keys.state,
            keys.idempotency(org, idempotency_key)
            if idempotency_key
            else org_keys.shard.no_idempotency,
            adm.request_id,
            # "a", the middleware's quiet item (a usage-charged answer), without a call.
            ("c" if ok else "r")
            if ext is None
            else "a"
            if ok and len(ext) == 1
            else _extended_outcome(ok, ext),
            _STATUS_TEXT.get(status) or ("" if status is None else str(status)),
            "" if latency_ms is None else str(latency_ms),
            done,
            ext,
        )
        # _enqueue, inlined: this is every metered request's settle.
        if done is not None:
            self._waiting = True
        shard = org_keys.shard.shard
        queue = self._pending.get(shard)
        if queue is None:
            self._pending[shard] = [item]
        else:
            queue.append(item)
        handle, loop = self._flush_handle, self._flush_loop
        if handle is None or loop is None or loop.is_closed():
            # (A flush left scheduled on a loop that has since closed is replaced.)
            self._schedule_flush(self.window_s if done is None else 0.0)
        elif done is not None and self._flush_delayed:
            handle.cancel()  # someone waits: flush at the next iteration instead
            self._schedule_flush(0.0)

    def queue_reservation(
        self,
        org: str,
        reservation_id: str,
        ok: bool,
        ext: tuple[str, ...],
        done: asyncio.Future[Any],
    ) -> None:
        """Queue the settle (``ok``) or release of ``org``'s reservation: its item's
        second key is where its result is kept (lua/settle.lua)."""
        org_keys = self.keys.of_org(org)
        item: _Settle = (
            org_keys.state,
            org_keys.shard.reservation(org, reservation_id),
            reservation_id,
            "C" if ok else "R",
            "",
            "",
            done,
            ext,
        )
        self._enqueue(org_keys.shard.shard, item, done)

    def _enqueue(self, shard: int, item: _Settle, done: asyncio.Future[Any] | None) -> None:
        if done is not None:
            self._waiting = True
        queue = self._pending.get(shard)
        if queue is None:
            self._pending[shard] = [item]
        else:
            queue.append(item)
        handle, loop = self._flush_handle, self._flush_loop
        if handle is None or loop is None or loop.is_closed():
            # (A flush left scheduled on a loop that has since closed is replaced.)
            self._schedule_flush(self.window_s if done is None else 0.0)
        elif done is not None and self._flush_delayed:
            handle.cancel()  # someone waits: flush at the next iteration instead
            self._schedule_flush(0.0)

    def _schedule_flush(self, delay: float) -> None:
        # One callback flushes every shard queued meanwhile.
        loop = self._flush_loop = asyncio.get_running_loop()
        self._flush_delayed = delay > 0
        self._flush_handle = (
            loop.call_later(delay, self._flush) if delay > 0 else loop.call_soon(self._flush)
        )

    def _flush(self) -> None:
        self._flush_handle = self._flush_loop = None
        pending, self._pending = self._pending, {}
        waiting, self._waiting = self._waiting, False
        shards = self._shards
        batches: list[tuple[ShardKeys, list[_Settle]]] = []
        for number, items in pending.items():
            if len(items) <= _BATCH:  # nearly always: no slice (a copy) of the queue
                batches.append((shards[number], items))
            else:
                batches += [
                    (shards[number], items[start : start + _BATCH])
                    for start in range(0, len(items), _BATCH)
                ]
        if len(batches) > 1 and not self.wait_replicas:
            many = getattr(self.runner, "run_encoded_many", None)
            if many is not None:
                # Many orgs spread their settles over the shards: one task sends every
                # shard's batch (on a single Redis in one call, else the same calls in the
                # same write) instead of a task, a coroutine and a future wait per shard.
                # Nothing waits longer: the window, hence what a crash loses, is unchanged.
                self._start(self._run_all(batches, many, waiting))
                return
        for shard, items in batches:
            self._start(self._run(shard, items, waiting))

    def _start(self, run: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(run)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run_all(
        self,
        batches: list[tuple[ShardKeys, list[_Settle]]],
        many: Callable[[LuaScript, list[tuple[int, bytes]]], Awaitable[list[Any]]],
        waiting: bool = True,
    ) -> None:
        """Several shards' batches sent together (``run_encoded_many``): with
        ``multi_shard`` as few settle.lua calls as ``_BATCH`` allows (its multi-shard form:
        one call per flush with many orgs), else one call per shard. A batch that is not
        all fixed-cost or short ASCII values, or whose call met ``RedisUnavailable``, takes
        :meth:`_run` (its own encoding and retries: settling twice is harmless, the hold is
        gone the second time); an error reply, of a call or of one group of a call, is
        logged and given to that batch's waiting callers, never sent again (the script may
        have written part of it). ``waiting``: whether any item has a future (else the
        replies are not walked)."""
        now = self._now_ms()
        heads = self._heads
        # Per call: its batches (one: the single form) and its encoding.
        sent: list[list[tuple[ShardKeys, list[_Settle]]]] = []
        calls: list[tuple[int, bytes]] = []
        if self.multi_shard:
            groups: list[tuple[tuple[str, str, int], int]] = []
            together: list[tuple[ShardKeys, list[_Settle]]] = []
            size = 0
            for shard, items in batches:
                group = encode_group(items, heads[shard.shard])
                if group is None:
                    self._start(self._run(shard, items, waiting))
                    continue
                if size + len(items) > _BATCH and together:
                    # A call settles at most _BATCH holds: Redis runs one call at a time.
                    sent.append(together)
                    calls.append(_encode_call(groups, now))
                    groups, together, size = [], [], 0
                groups.append((group, len(items)))
                together.append((shard, items))
                size += len(items)
            if together:
                sent.append(together)
                calls.append(_encode_call(groups, now))
        else:
            for shard, items in batches:
                encoded = encode_fixed(shard, items, now, heads[shard.shard])
                if encoded is None:
                    self._start(self._run(shard, items, waiting))
                else:
                    sent.append([(shard, items)])
                    calls.append(encoded)
        if not calls:
            return
        replies = await many(self.script, calls)
        for together, reply in zip(sent, replies, strict=True):
            if isinstance(reply, RedisUnavailable):
                for shard, items in together:
                    self._start(self._run(shard, items, waiting))
                continue
            if isinstance(reply, BaseException):
                # An error reply (the script failed, perhaps after some of its writes):
                # never sent again, as _run would not either.
                for shard, items in together:
                    _failed(shard, items, reply)
                continue
            if len(together) == 1:
                self._answer(together[0][1], reply, waiting)
                continue
            for (shard, items), group_reply in zip(together, reply, strict=True):
                if isinstance(group_reply, BaseException):
                    # One group's settling raised an error (settle.lua's pcall): the other
                    # groups were settled; this one is treated as a failed call of its own,
                    # never resent, whatever its error (it may have written part).
                    _failed(shard, items, RedisReplyError(str(group_reply)))
                else:
                    self._answer(items, group_reply, waiting)

    @staticmethod
    def _answer(items: list[_Settle], reply: Any, waiting: bool) -> None:
        """A batch's reply to its waiting callers (``waiting``: whether any waits)."""
        if not waiting:
            return
        for it, result in zip(items, reply, strict=True):
            done = it[6]
            if done is not None and not done.done():
                # An extended item's reply is its own (a list for "C" | "R"), as in _run.
                done.set_result(int(result) if it[7] is None else result)

    async def _run(self, shard: ShardKeys, items: list[_Settle], waiting: bool = True) -> None:
        now = self._now_ms()
        encoded = (
            None
            if self.wait_replicas
            else encode_fixed(shard, items, now, self._heads[shard.shard])
        )
        keys: list[str] = []
        args: list[str | int] = []
        if encoded is None:
            keys += (shard.holds, shard.holdexp, shard.events)
            args += (now, len(items))
            for it in items:
                keys += it[:2]
                args += it[2:6]
                ext = it[7]
                if ext is not None:
                    args += ext
            if self.wait_replicas:
                await self._run_durable(shard, items, keys, args)
                return
        delay = 0.05
        for attempt in range(_RETRIES):
            try:
                if encoded is None:
                    reply = await self.runner.run(self.script, keys, args)
                else:
                    reply = await self.runner.run_encoded(self.script, *encoded)
            except RedisUnavailable as exc:
                # Settling twice is harmless (the hold is gone the second time), so unlike a
                # debit it can be retried. If Redis stays away the hold expires into a charge.
                if attempt == _RETRIES - 1:
                    log.error(
                        "settle failed for %d holds on shard %d: %s", len(items), shard.shard, exc
                    )
                    for it in items:
                        done = it[6]
                        if done is not None and not done.done():
                            done.set_exception(exc)
                    return
                await asyncio.sleep(delay)
                delay *= 2
                continue
            except RedisReplyError as exc:
                # The script failed, perhaps after some of its writes: never sent again.
                # Its waiting callers get the error instead of waiting forever.
                _failed(shard, items, exc)
                return
            self._answer(items, reply, waiting)
            return

    async def _run_durable(
        self, shard: ShardKeys, items: list[_Settle], keys: list[str], args: list[str | int]
    ) -> None:
        """Send the batch, and again, until ``wait_replicas`` replicas acknowledged it or
        ``_DURABLE_FOR_S`` passed; the futures get the first reply (module docstring)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + _DURABLE_FOR_S
        run_replicated = self.runner.run_replicated  # type: ignore[attr-defined]
        pause, answered, first_node = 0.05, False, ""
        while True:
            self.stats["sent"] += 1
            try:
                reply, acked, node = await run_replicated(
                    self.script, keys, args, self.wait_replicas, self.wait_timeout_ms
                )
            except RedisUnavailable as exc:
                error: RedisUnavailable | None = exc
            else:
                error = None
                if not answered:
                    answered = True
                    for it, result in zip(items, reply, strict=True):
                        done = it[6]
                        if done is not None and not done.done():
                            done.set_result(int(result) if it[7] is None else result)
                if acked >= self.wait_replicas:
                    return
                if first_node and node != first_node:
                    # Ran on the promoted replica: the hold that came back is settled now.
                    self.stats["failed_over"] += 1
                    return
                first_node = first_node or node
                self.stats["unconfirmed"] += 1
            if loop.time() + pause > give_up_at:
                self.stats["given_up"] += 1
                log.error(
                    "settle of %d holds on shard %d not confirmed by %d replicas within %g s%s",
                    len(items), shard.shard, self.wait_replicas, _DURABLE_FOR_S,
                    f": {error}" if error else "",
                )  # fmt: skip
                for it in items:
                    done = it[6]
                    if done is not None and not done.done():
                        done.set_exception(error or RedisUnavailable("settle not confirmed"))
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, _DURABLE_MAX_PAUSE_S)

    async def close(self) -> None:
        """Release the settles' own connections (durable settles only)."""
        if self._own_runner is not None:
            await self._own_runner.close()

    async def drain(self) -> None:
        """Wait until every queued settle has reached Redis (shutdown, tests)."""
        await asyncio.sleep(0)
        while self._pending or self._inflight:
            if self._pending:
                # Now, not after the settle window (or on a loop that is gone).
                handle, loop = self._flush_handle, self._flush_loop
                if handle is not None and loop is not None and not loop.is_closed():
                    handle.cancel()
                self._flush()
            if self._inflight:
                await asyncio.gather(*list(self._inflight), return_exceptions=True)
            else:
                await asyncio.sleep(0)

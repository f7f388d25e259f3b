"""The settle batch, encoded by hand (``encode_fixed``), is byte for byte the EVALSHA of
lua/settle.lua's KEYS and ARGV that hiredis packs, fixed-cost and extended items alike
(a usage cost's actual), and falls back to packing when a value is not ASCII or too long;
settles sent that way charge and refund on a real script runner as before."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.redis_keys import KeySpace
from gateway.metering.gate import CreditGate
from gateway.metering.settlement import (
    Actual,
    encode_fixed,
    encode_group,
    encode_many,
    shard_head,
)
from gateway.redisio.resp import decode_args, encode_args
from gateway.usage.model import Usage

KEYS = KeySpace("P", 16)


def _item(
    org: str,
    idem: str | None,
    rid: str,
    outcome: str,
    status: str,
    latency: str,
    ext: tuple[str, ...] | None = None,
) -> tuple[Any, ...]:
    org_keys = KEYS.of_org(org)
    second = KEYS.idempotency(org, idem) if idem else org_keys.shard.no_idempotency
    return (org_keys.state, second, rid, outcome, status, latency, None, ext)


def _packed(items: list[tuple[Any, ...]], now: int) -> bytes:
    """What Settlement._run packs with hiredis for the same batch."""
    shard = KEYS.of_org("a").shard
    keys = [shard.holds, shard.holdexp, shard.events]
    args: list[Any] = [now, len(items)]
    for it in items:
        keys += it[:2]
        args += it[2:6]
        if it[7] is not None:
            args += it[7]
    return encode_args([len(keys), *keys, *args])


def test_a_fixed_batch_is_what_hiredis_packs() -> None:
    shard = KEYS.of_org("a").shard
    items = [
        _item("a", None, "f" * 32, "c", "200", "12"),
        _item("a", "key-1", "0" * 32, "r", "", ""),  # no status, no latency: empty strings
        _item("a", None, "rid", "r", "502", "30000"),
    ]
    encoded = encode_fixed(shard, items, 1_796_083_200_000)
    assert encoded is not None
    count, raw = encoded
    assert raw == _packed(items, 1_796_083_200_000)
    assert count == len(decode_args(raw)) == 6 + 6 * len(items)


def test_extended_items_are_what_hiredis_packs() -> None:
    shard = KEYS.of_org("a").shard
    items = [
        _item("a", None, "r0", "c", "200", "1"),
        _item("a", None, "r1", "a", "200", "9", ("37 usage  41 0 12 0 gpt-4o-mini",)),
        _item("a", "key-2", "r2", "C", "200", "3", ("5 policy 1     ", "", "")),
        _item("a", None, "r3", "R", "", "", ("", "", "org-r")),
        _item("a", None, "r4", "a", "200", "2", ("0 usage  0 0 0 0 ",)),  # a model with spaces
    ]
    encoded = encode_fixed(shard, items, 7)
    assert encoded is not None
    count, raw = encoded
    assert raw == _packed(items, 7)
    assert count == len(decode_args(raw)) == 6 + 6 * len(items) + 1 + 3 + 3 + 1


def test_a_multi_shard_call_is_what_hiredis_packs() -> None:
    """settle.lua's multi-shard form: every group's keys, then now, "*" and each group's
    item count and values (lua/settle.lua's header)."""
    groups = {
        "a": [_item("a", None, "r0", "c", "200", "1"), _item("a", "k", "r1", "r", "", "")],
        "b": [_item("b", None, "r2", "a", "200", "9", ("37 usage  41 0 12 0 gpt-4o-mini",))],
        "c": [_item("c", None, "r3", "C", "200", "3", ("5 policy 1     ", "", ""))],
    }
    keys: list[Any] = []
    args: list[Any] = [1_796_083_200_000, "*"]
    encoded = []
    for org, items in groups.items():
        shard = KEYS.of_org(org).shard
        keys += [shard.holds, shard.holdexp, shard.events]
        args.append(len(items))
        for it in items:
            keys += it[:2]
            args += it[2:6]
            if it[7] is not None:
                args += it[7]
        group = encode_group(items, shard_head(shard))
        assert group is not None
        encoded.append((group, len(items)))
    count, raw = encode_many(encoded, 1_796_083_200_000)
    assert raw == encode_args([len(keys), *keys, *args])
    assert count == len(decode_args(raw))


def test_kept_key_pairs_encode_the_same_bytes() -> None:
    """An item's two keys are kept as text per pair (most settles of an org repeat it):
    the same batch encodes the same bytes the first time, again, and after more pairs
    than are kept (an idempotency key per request) emptied the store."""
    from gateway.metering import settlement

    shard = KEYS.of_org("a").shard
    items = [
        _item("a", None, "f" * 32, "c", "200", "12"),
        _item("a", "key-1", "0" * 32, "r", "", ""),
        _item("a", None, "1" * 32, "c", "200", "7"),
    ]
    expected = _packed(items, 1)
    for _ in range(2):
        assert encode_fixed(shard, items, 1) == (6 + 6 * len(items), expected)
    many = [_item("a", f"key-{n}", "r", "c", "200", "1") for n in range(settlement._KEY_TEXT_MAX)]
    assert encode_fixed(shard, many, 1) == (6 + 6 * len(many), _packed(many, 1))
    assert len(settlement._KEY_TEXT) <= settlement._KEY_TEXT_MAX
    assert encode_fixed(shard, items, 1) == (6 + 6 * len(items), expected)
    # A pair that is not ASCII is kept too, and still left to hiredis every time.
    for _ in range(2):
        assert encode_fixed(shard, [_item("clé", None, "r0", "c", "200", "1")], 1) is None


def test_non_ascii_and_long_values_are_left_to_hiredis() -> None:
    shard = KEYS.of_org("a").shard
    # A key's length in characters is not its length in bytes: never written by hand.
    assert encode_fixed(shard, [_item("clé", None, "r0", "c", "200", "1")], 1) is None
    # Nor is an extension value's (a model name), and a kept response is mostly too long.
    model = ("3 usage  1 0 1 0 modèle",)
    assert encode_fixed(shard, [_item("a", None, "r0", "a", "200", "1", model)], 1) is None
    response = ("3 usage  1 0 1 0 m", "x" * 256, "")
    assert encode_fixed(shard, [_item("a", None, "r0", "C", "200", "1", response)], 1) is None
    assert encode_fixed(shard, [_item("a", None, "r0", "C", "200", "1", ("", "x" * 255, ""))], 1)


def _settle_key_counts(gate: CreditGate) -> list[int]:
    """The key counts of the settle calls ``gate``'s runner sends encoded, as they go."""
    sent: list[int] = []
    runner = gate.redis.runner
    real = runner.run_encoded

    async def run_encoded(script: Any, count: int, encoded: bytes) -> Any:
        if script.name == "settle":
            sent.append(count)
        return await real(script, count, encoded)

    runner.run_encoded = run_encoded  # type: ignore[method-assign]
    return sent


async def test_settles_sent_encoded_charge_and_refund(memgate: CreditGate) -> None:
    meter = memgate.meter
    sent = _settle_key_counts(memgate)
    await memgate.set_plan("org-enc", "pro")
    charged = await meter.admit("org-enc", "general_insights", user="u1")
    refunded = await meter.admit("org-enc", "general_insights", user="u1")
    assert charged.ok and refunded.ok
    first = meter.settle(charged, ok=True, status=200, latency_ms=5)
    second = meter.settle(refunded, ok=False, status=503, latency_ms=7)
    assert await first == charged.cost
    assert await second == 0
    assert sent == [6 + 6 * 2]  # both in one encoded batch
    # The refund gave its hold back: the next admission sees one token fewer than before,
    # not two.
    after = await meter.admit("org-enc", "general_insights", user="u1")
    assert after.remaining == refunded.remaining


async def test_a_usage_settle_goes_encoded_with_a_fixed_one(memgate: CreditGate) -> None:
    """The middleware's settle of an actual (a quiet item) and a fixed one in one batch: sent
    encoded, the actual charged in place of the hold, the fixed cost as held."""
    meter = memgate.meter
    sent = _settle_key_counts(memgate)
    await memgate.set_plan("org-act", "pro")
    fixed = await meter.admit("org-act", "general_insights", user="u1")
    usage = await meter.admit("org-act", "general_insights", user="u1", cost=5)
    assert fixed.ok and usage.ok and fixed.remaining is not None
    meter.settle_nowait(fixed, ok=True, status=200, latency_ms=5)
    actual = Actual(2, Usage("openai", "gpt-4o-mini", 10, 0, 3, 0))
    meter.settle_nowait(usage, ok=True, status=200, latency_ms=6, actual=actual)
    await meter.drain()
    assert sent == [6 + 6 * 2 + 1]
    after = await meter.admit("org-act", "general_insights", user="u1")
    # The fixed cost and the actual (2, not the hold of 5) taken, then this hold.
    assert after.remaining == fixed.remaining + fixed.cost - fixed.cost - 2 - after.cost


@pytest.mark.parametrize("ok", [True, False])
async def test_a_settle_of_an_unknown_hold_is_gone(memgate: CreditGate, ok: bool) -> None:
    await memgate.set_plan("org-gone", "pro")
    adm = await memgate.meter.admit("org-gone", "general_insights", user="u1")
    assert await memgate.meter.settle(adm, ok=ok, status=200, latency_ms=1) == (
        adm.cost if ok else 0
    )
    # The same hold again: gone, nothing charged twice.
    assert await memgate.meter.settle(adm, ok=ok, status=200, latency_ms=1) == -1


def test_a_value_of_256_characters_or_more_is_left_to_hiredis() -> None:
    shard = KEYS.of_org("a").shard
    assert encode_fixed(shard, [_item("a", None, "r" * 255, "c", "200", "1")], 1) is not None
    assert encode_fixed(shard, [_item("a", None, "r" * 256, "c", "200", "1")], 1) is None
    # A usage-charged answer's one extension value (its own branch in encode_group).
    quiet = [_item("a", None, "r", "a", "200", "1", ("9 usage  1 0 1 0 " + "m" * 238,))]
    assert encode_fixed(shard, quiet, 1) is not None
    assert encode_fixed(shard, quiet, 1) == (13, _packed(quiet, 1))
    long = [_item("a", None, "r", "a", "200", "1", ("9 usage  1 0 1 0 " + "m" * 239,))]
    assert encode_fixed(shard, long, 1) is None


@pytest.mark.parametrize("prefix", ["P", "p" * 300, "cl\u00e9"])
def test_a_kept_shard_head_encodes_the_same_bytes(prefix: str) -> None:
    # Settlement keeps each shard's head (its 3 keys) and passes it in: the same bytes as
    # encode_fixed building it, and as hiredis packing the batch; a non-ASCII prefix or
    # one long enough for 256-character keys still falls back to hiredis.
    keys = KeySpace(prefix, 16)
    shard = keys.of_org("a").shard
    org_keys = keys.of_org("a")
    items: list[Any] = [
        (org_keys.state, shard.no_idempotency, "r1", "c", "200", "3", None, None),
        (
            org_keys.state,
            keys.idempotency("a", "k"),
            "r2",
            "a",
            "200",
            "4",
            None,
            ("7 usage     ",),
        ),
    ]
    kept = encode_fixed(shard, items, 5, shard_head(shard))
    assert kept == encode_fixed(shard, items, 5)
    if not prefix.isascii() or len(org_keys.state) > 255:
        assert kept is None  # packed by hiredis instead (a long prefix: the org keys too)
        return
    assert kept is not None
    hkeys = [shard.holds, shard.holdexp, shard.events, *(k for it in items for k in it[:2])]
    args = [5, 2, *items[0][2:6], *items[1][2:6], *items[1][7]]
    assert kept[1] == encode_args([len(hkeys), *hkeys, *args])
    assert kept[0] == len(decode_args(kept[1]))


@pytest.mark.parametrize(("status", "text"), [(200, "200"), (503, "503"), (None, ""), (99, "99")])
async def test_a_queued_settle_writes_its_status_as_text(
    memgate: CreditGate, status: int | None, text: str
) -> None:
    """Statuses are written from a kept table of their texts; one outside it (or none) is
    still written as ``str`` (or empty) would."""
    meter = memgate.meter
    await memgate.set_plan("org-st", "pro")
    adm = await meter.admit("org-st", "general_insights", user="u1")
    meter.settlement.queue(adm, True, status, 12, None, None)
    (item,) = [i for queue in meter.settlement._pending.values() for i in queue]
    assert item[4:6] == (text, "12")
    await meter.drain()


async def test_charges_of_many_costs_carry_their_own_cost_text(memgate: CreditGate) -> None:
    """The charge keeps the text of the costs it has seen (bounded): each admission still
    holds its own cost, past the bound too."""
    meter = memgate.meter
    await memgate.set_plan("org-costs", "enterprise")
    admitter = meter.admission
    for cost in (1, 2, 1, 3):
        adm = await meter.admit("org-costs", "general_insights", user="u1", cost=cost)
        assert adm.ok and adm.cost == cost
    assert admitter._totals == {1: "1", 2: "2", 3: "3"}
    admitter._totals.update({n: str(n) for n in range(1000, 2021)})  # full: not kept
    before = (await meter.admit("org-costs", "general_insights", user="u1", cost=1)).remaining
    after = await meter.admit("org-costs", "general_insights", user="u1", cost=7)
    assert after.ok and after.remaining == (before or 0) - 7 and 7 not in admitter._totals

"""The Redis key layout (gateway/core/redis_keys.py): every key name exactly as documented
(Redis data written by earlier versions must still be found), one slot per org, and the
per-org lookup cache bounded."""

from __future__ import annotations

import hashlib

import pytest
from redis.crc import key_slot

from gateway.core import redis_keys
from gateway.core.redis_keys import KeySpace, shard_of


def test_every_key_name_as_documented() -> None:
    ks = KeySpace("P", 16)
    n = shard_of("acme", 16)
    tag = f"P:{{s{n}}}"
    shard = ks.shard("acme")
    digest = hashlib.sha256(b"client-key").hexdigest()
    assert (shard.shard, shard.tag) == (n, tag)
    assert [shard.holds, shard.holdexp, shard.events, shard.dead_letters] == [
        f"{tag}:holds", f"{tag}:holdexp", f"{tag}:events", f"{tag}:events:dead",
    ]  # fmt: skip
    assert ks.org("acme") == shard.org("acme") == f"{tag}:org:acme"
    assert shard.org_prefix == f"{tag}:org:"
    assert ks.idempotency("acme", "client-key") == f"{tag}:idem:acme:{digest}"
    assert ks.no_idempotency("acme") == shard.no_idempotency == f"{tag}:idem:-"
    assert ks.user_limiter("acme", "bob", 20, 60000) == f"{tag}:rl:acme:u:bob:20/60000"
    assert ks.api_key_cache("ab12") == "P:keys:ab12"
    assert ks.stripe_event("evt_1") == "P:stripe:evt:evt_1"
    assert ks.stripe_subscription("acme") == "P:stripe:sub:acme"


@pytest.mark.parametrize("org", ["acme", "org-1", "ÜnïcødeOrg", "x" * 200])
def test_an_orgs_keys_share_one_cluster_slot(org: str) -> None:
    ks = KeySpace("cg", 16)
    shard = ks.shard(org)
    keys = [
        ks.org(org), shard.holds, shard.holdexp, shard.events, shard.dead_letters,
        ks.idempotency(org, "k"), shard.no_idempotency, ks.user_limiter(org, "u", 1, 1000),
    ]  # fmt: skip
    assert len({key_slot(k.encode()) for k in keys}) == 1


def test_org_lookups_are_cached_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_keys, "_ORG_CACHE_SIZE", 3)
    ks = KeySpace("cg", 4)
    first = ks.of_org("a")
    assert ks.of_org("a") is first and first.shard is ks.shard("a")
    for org in ("b", "c", "d", "e"):
        assert ks.of_org(org).state == f"{ks.shard(org).tag}:org:{org}"
    assert len(ks._orgs) <= 3
    assert ks.of_org("a") == first  # rebuilt after the cache emptied: the same keys


def test_cached_org_answers_what_of_org_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cached_org`` (of_org's lookup without its call) is None until of_org made the
    org's keys, then those very keys; still so once the bounded cache was emptied."""
    monkeypatch.setattr(redis_keys, "_ORG_CACHE_SIZE", 3)
    ks = KeySpace("cg", 4)
    assert ks.cached_org("a") is None
    first = ks.of_org("a")
    assert ks.cached_org("a") is first
    for org in ("b", "c", "d", "e"):
        ks.of_org(org)
        assert ks.cached_org(org) is ks.of_org(org)
    assert ks.cached_org("a") is None  # emptied with the cache
    assert ks.cached_org("e") is ks.of_org("e")

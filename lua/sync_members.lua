-- sync_members.lua: a sync process's heartbeat; returns the live processes (sync/leases.py).
--
-- KEYS[1]  the members zset (P:sync:members): consumer name scored by when its
--          membership expires, in ms of Redis's clock (so hosts' clocks need not agree)
-- ARGV[1]  the consumer name of the calling process
-- ARGV[2]  TTL (ms) of its membership; 0: leave (remove it now)
--
-- Expired members (processes that died) are dropped first. Returns the live members'
-- names, sorted (every process computes the same assignment from the same list). The zset
-- has no TTL of its own: a dead member's entry stays until a later heartbeat drops it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ttl > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(members)
return members

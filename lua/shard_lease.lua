-- shard_lease.lua: take, keep or give back a sync process's lease on one shard
-- (sync/leases.py). The lease is a string holding the owner's consumer name, with a TTL.
--
-- KEYS[1]  the shard's lease key (P:{sN}:sync:lease)
-- ARGV[1]  the consumer name of the calling process
-- ARGV[2]  TTL (ms): take the lease if it is free, or renew it if the caller holds it;
--          0: give it back (deleted only if the caller holds it)
--
-- Returns 2: taken now (it was free), 1: held by the caller (renewed, or given back),
-- 0: held by another process (nothing changed).
local owner = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
if owner == ARGV[1] then
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  else
    redis.call('DEL', KEYS[1])
  end
  return 1
end
if owner then
  return 0
end
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  return 2
end
return 0

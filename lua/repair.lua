-- repair.lua: set one bucket's balances to the ledger's values (creditgate reconcile
-- --repair) and record the correction as an event, so the ledger explains every change.
--
-- KEYS[1]  org state hash    KEYS[2]  org's shard events stream
-- ARGV[1]  now (ms)    ARGV[2]  org    ARGV[3]  bucket    ARGV[4]  plan balance
-- ARGV[5]  extra       ARGV[6]  operation id
-- ARGV[7]  purchased lots JSON ([[reference, expires_ms, remaining], ...], summing to extra)
-- ARGV[8]  the least sequence number the repair event may carry (optional): the ledger's
--          newest plus one, for an org whose Redis state went back (lost writes)
--
-- Returns {"missing"} or {"ok", tokens_deducted} (old total - new total).
--
-- Audit events are written by audit_event, defined in lua/_prelude.lua (the loader
-- prepends it).

local org_key, stream_key = KEYS[1], KEYS[2]
local now, org, b = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local bal, extra, op, lots = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
if redis.call('EXISTS', org_key) == 0 then
  return {'missing'}
end
local st = redis.call('HMGET', org_key, 'b:' .. b, 'x:' .. b, 'a:' .. b, 'u:' .. b, 'p:' .. b,
  'plan')
local delta = (tonumber(st[1] or '0') + tonumber(st[2] or '0')) - (bal + extra)
local seq = redis.call('HINCRBY', org_key, 'seq', 1)
local floor = tonumber(ARGV[8] or '')
if floor and seq < floor then
  -- Redis lost writes the ledger has: jump past them, so this event and every later one
  -- is newer than the ledger's snapshot.
  seq = floor
  redis.call('HSET', org_key, 'seq', seq)
end
redis.call('HSET', org_key, 'b:' .. b, bal, 'x:' .. b, extra, 'l:' .. b, lots)
audit_event(stream_key,
  'repair:' .. op .. ':' .. b, 'repair', org, '', '', b, delta,  -- id, k, o, u, f, b, t
  -- bal, x, a, used, per, s, ts
  bal, extra, st[3] or '0', st[4] or '0', st[5] or '', seq, now,
  '', '', '', '', '', st[6] or '', op)  -- rq, st, lat, m, r, p, ref
return {'ok', delta}

-- grant.lua: add purchased tokens (a top-up lot) to an org's bucket, once per reference.
--
-- KEYS[1]  org state hash    KEYS[2]  org's shard events stream
-- ARGV[1]  now (ms)    ARGV[2]  org    ARGV[3]  bucket    ARGV[4]  amount
-- ARGV[5]  expires (ms; 0 = never)     ARGV[6]  reference (idempotency of the grant)
--
-- Returns {"missing"} (seed first), {"duplicate"} (reference already applied), or
-- {"ok", extra_after}.
--
-- Audit events are written by audit_event, defined in lua/_prelude.lua (the loader
-- prepends it).

local org_key, stream_key = KEYS[1], KEYS[2]
local now, org, b = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local amount, expires, ref = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
if redis.call('EXISTS', org_key) == 0 then
  return {'missing'}
end
if redis.call('HSETNX', org_key, 'g:' .. ref, now) == 0 then
  return {'duplicate'}
end
local st = redis.call('HMGET', org_key, 'x:' .. b, 'l:' .. b, 'b:' .. b, 'a:' .. b, 'u:' .. b,
  'p:' .. b, 'plan')
local lots = cjson.decode(st[2] or '[]')
lots[#lots + 1] = {ref, expires, amount}
table.sort(lots, function(x, y)
  local ex = x[2] == 0 and math.huge or x[2]
  local ey = y[2] == 0 and math.huge or y[2]
  return ex < ey
end)
local extra = tonumber(st[1] or '0') + amount
local seq = redis.call('HINCRBY', org_key, 'seq', 1)
redis.call('HSET', org_key, 'x:' .. b, extra, 'l:' .. b, cjson.encode(lots))
audit_event(stream_key,
  'grant:' .. org .. ':' .. ref, 'grant', org, '', '', b, -amount,  -- id, k, o, u, f, b, t
  -- bal, x, a, used, per, s, ts
  st[3] or '0', extra, st[4] or '0', st[5] or '0', st[6] or '', seq, now,
  '', '', '', '', '', st[7] or '', ref)  -- rq, st, lat, m, r, p, ref
return {'ok', extra}

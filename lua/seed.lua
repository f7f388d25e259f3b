-- seed.lua: create an org's state from the ledger when Redis has none (first use, or
-- Redis lost its data). Set-if-absent for the whole hash: when many processes see the
-- miss at once, exactly one seeds and the others' calls change nothing.
--
-- KEYS[1]  org state hash
-- ARGV[1]  plan    ARGV[2]  seq (the ledger's last sequence number for the org)
-- ARGV[3]  number of buckets N, then per bucket 7 values: bucket, balance, allocated,
--          used, period id, extra, lots JSON ([[reference, expires_ms, remaining], ...])
-- then, optionally: the number of level fields M (teams, members and cap overrides of
--          contract A10, named in gateway/core/caps.py), then M field/value pairs; M > 0
--          also sets lv, a new levels version (the org has levels: charge.lua reads them).
-- then, optionally: the org's period anchor (contract A12, field pa; "" = none).
--
-- Returns 1 when seeded, 0 when the org already had state (nothing written).

local org_key = KEYS[1]
if redis.call('EXISTS', org_key) == 1 then
  return 0
end
redis.call('HSET', org_key, 'plan', ARGV[1], 'seq', tonumber(ARGV[2]))
local n = tonumber(ARGV[3])
for j = 0, n - 1 do
  local a = 4 + 7 * j
  local b = ARGV[a]
  redis.call('HSET', org_key, 'b:' .. b, tonumber(ARGV[a + 1]), 'a:' .. b, tonumber(ARGV[a + 2]),
    'u:' .. b, tonumber(ARGV[a + 3]), 'p:' .. b, ARGV[a + 4], 'x:' .. b, tonumber(ARGV[a + 5]),
    'l:' .. b, ARGV[a + 6])
end
local at = 4 + 7 * n
local m = tonumber(ARGV[at] or '0')
for j = 0, m - 1 do
  redis.call('HSET', org_key, ARGV[at + 1 + 2 * j], ARGV[at + 2 + 2 * j])
end
if m > 0 then
  -- A new levels version (as lua/levels.lua writes it: 128 bytes, the org's hash is a hash
  -- table, not a listpack): templates cached before Redis lost the org do not match it.
  local t = redis.call('TIME')
  local v = 'v' .. t[1] .. '.' .. t[2] .. '.' .. redis.call('HINCRBY', org_key, 'lvn', 1)
  redis.call('HSET', org_key, 'lv', v, 'lvp', string.rep('.', 128))
end
local anchor = ARGV[at + 1 + 2 * m]
if anchor and anchor ~= '' then
  redis.call('HSET', org_key, 'pa', anchor)
end
return 1

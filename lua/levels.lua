-- levels.lua: mirror an admin change of teams, members or cap overrides (contract A10)
-- into the org's hash, after the change is committed to Postgres, so that the next
-- charge.lua call of every gateway process reads it (no cache to expire).
--
-- KEYS[1]  org state hash
-- ARGV[1]  number of fields to set S, then S field/value pairs, then the fields to delete
--          (field names: gateway/core/caps.py)
--
-- Returns "missing" when the org has no state in Redis (nothing written: seeding it from
-- the ledger brings the change along), else "ok". Sets lv to a new levels version: it makes
-- charge.lua read the levels of the org's requests, and the levels every gateway process
-- cached for this org (in its charge.lua templates) stale, so the next charge of each
-- reads them in full (lua/charge.lua, "Levels"; fields: gateway/core/caps.py).

local unpack = unpack or table.unpack
local org_key = KEYS[1]
if redis.call('HEXISTS', org_key, 'plan') == 0 then
  return 'missing'
end
local s = tonumber(ARGV[1])
-- lvp's value is 128 bytes, longer than Redis's hash-max-listpack-value (64 by default):
-- the org's hash becomes (and, through restarts, stays) a hash table. In a listpack every
-- field lookup scans the whole hash, and an org with levels has fields per team, member
-- and cap: charge.lua's dozen lookups then cost more than the rest of the charge
-- (BENCHMARKS.md, "Team/user/key caps").
-- The version is unique per org without a clock or counter of the gateway's: the server's
-- time (µs) and a counter of the org's (lvn), so neither a clock step back nor a counter
-- restarted by a re-seed after Redis lost the org repeats an older one.
local t = redis.call('TIME')
local v = 'v' .. t[1] .. '.' .. t[2] .. '.' .. redis.call('HINCRBY', org_key, 'lvn', 1)
local set = {'lv', v, 'lvp', string.rep('.', 128)}
for j = 2, 1 + 2 * s do
  set[#set + 1] = ARGV[j]
end
redis.call('HSET', org_key, unpack(set))
local del = {}
for j = 2 + 2 * s, #ARGV do
  del[#del + 1] = ARGV[j]
end
if #del > 0 then
  redis.call('HDEL', org_key, unpack(del))
end
return 'ok'

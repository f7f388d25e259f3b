-- levels.lua: mirror an admin change of teams, members or cap overrides (contract A10)
-- into the org's hash, after the change is committed to Postgres, so that the next
-- charge.lua call of every gateway process reads it (no cache to expire).
--
-- KEYS[1]  org state hash
-- ARGV[1]  number of fields to set S, then S field/value pairs, then the fields to delete
--          (field names: gateway/core/caps.py)
--
-- Returns "missing" when the org has no state in Redis (nothing written: seeding it from
-- the ledger brings the change along), else "ok". Sets lv, the flag that makes charge.lua
-- read the levels of the org's requests (a 128-byte value: see below).

local unpack = unpack or table.unpack
local org_key = KEYS[1]
if redis.call('HEXISTS', org_key, 'plan') == 0 then
  return 'missing'
end
local s = tonumber(ARGV[1])
-- lv's value is 128 bytes, longer than Redis's hash-max-listpack-value (64 by default): the
-- org's hash becomes (and, through restarts, stays) a hash table. In a listpack every
-- field lookup scans the whole hash, and an org with levels has fields per team, member
-- and cap: charge.lua's dozen lookups then cost more than the rest of the charge
-- (BENCHMARKS.md, "Team/user/key caps").
local set = {'lv', '1' .. string.rep('.', 127)}
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

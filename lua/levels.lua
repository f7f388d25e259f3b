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
-- read the levels of the org's requests.

local unpack = unpack or table.unpack
local org_key = KEYS[1]
if redis.call('HEXISTS', org_key, 'plan') == 0 then
  return 'missing'
end
local s = tonumber(ARGV[1])
local set = {'lv', '1'}
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

-- set_plan.lua: change an org's plan at once. For every bucket whose state is in the
-- current period the balance moves by (new allocation - old allocation), never below
-- zero; buckets not yet in this period pick the new plan up at their lazy reset.
--
-- KEYS[1]  org state hash    KEYS[2]  org's shard events stream
-- ARGV[1]  now (ms)    ARGV[2]  period id    ARGV[3]  new plan    ARGV[4]  operation id
-- ARGV[5]  org         ARGV[6]  JSON {bucket: {plan: allocation, ...}, ...} for every bucket
--
-- Returns {"missing"} when the org has no state (seed it first, then call again), or
-- {"ok", old_plan, events_written}. Every plan change writes at least one event.
--
-- Audit events are written by audit_event, defined in lua/_prelude.lua (the loader
-- prepends it).

local org_key, stream_key = KEYS[1], KEYS[2]
local now, period, new_plan, op, org = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local allocations = cjson.decode(ARGV[6])
local old_plan = redis.call('HGET', org_key, 'plan')
if not old_plan then
  return {'missing'}
end
redis.call('HSET', org_key, 'plan', new_plan)
local written = 0
local buckets = {}
for b, _ in pairs(allocations) do buckets[#buckets + 1] = b end
table.sort(buckets)
for _, b in ipairs(buckets) do
  local per_plan = allocations[b]
  local st = redis.call('HMGET', org_key, 'b:' .. b, 'p:' .. b, 'x:' .. b, 'u:' .. b)
  if st[2] == period then
    local old_alloc = tonumber(per_plan[old_plan] or 0)
    local new_alloc = tonumber(per_plan[new_plan] or 0)
    local bal = tonumber(st[1] or '0')
    local after = math.max(0, bal + new_alloc - old_alloc)
    local seq = redis.call('HINCRBY', org_key, 'seq', 1)
    redis.call('HSET', org_key, 'b:' .. b, after, 'a:' .. b, new_alloc)
    audit_event(stream_key,
      -- id, k, o, u, f, b, t
      'plan_change:' .. op .. ':' .. b, 'plan_change', org, '', '', b, bal - after,
      after, st[3] or '0', new_alloc, st[4] or '0', period, seq, now,  -- bal .. ts
      '', '', '', '', '', new_plan, old_plan)  -- rq, st, lat, m, r, p, ref
    written = written + 1
  end
end
if written == 0 then
  -- No bucket is in the current period yet: record the change itself (no snapshot).
  audit_event(stream_key,
    'plan_change:' .. op .. ':', 'plan_change', org, '', '', '', 0,  -- id, k, o, u, f, b, t
    '', '', '', '', period, '', now,  -- bal, x, a, used, per, s, ts
    '', '', '', '', '', new_plan, old_plan)  -- rq, st, lat, m, r, p, ref
  written = 1
end
return {'ok', old_plan, written}

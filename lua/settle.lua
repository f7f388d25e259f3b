-- settle.lua: turn holds into charges or refunds and write one audit event per request.
-- Called after responses end, batched: every settle of one shard issued in the same event
-- loop tick goes in one call (all keys share the shard's hash tag).
--
-- KEYS[1]  shard holds hash    KEYS[2]  shard hold-expiry zset    KEYS[3]  shard events stream
-- then per item j (1-based): KEYS[2 + 2j] org state hash, KEYS[3 + 2j] idempotency key
--          (the hold's own key, or a never-written placeholder)
--
-- ARGV[1]  now (ms)    ARGV[2]  number of items N
-- then per item 4 values: request id, outcome ("c" = charge, "r" = refund),
--          upstream status ("" = none, "0" = connection error), latency (ms, "" = none)
--
-- Returns an array of N integers: tokens charged (0 for a refund), or -1 when the hold
-- no longer exists (already settled, or swept into an expired_hold charge).

local holds_key, holdexp_key, stream_key = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local results = {}

for j = 1, n do
  local a = 3 + 4 * (j - 1)
  local request_id, outcome, status, latency = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local org_key, idem_key = KEYS[2 + 2 * j], KEYS[3 + 2 * j]
  local raw = redis.call('HGET', holds_key, request_id)
  if not raw then
    results[j] = -1
  else
    local h = cjson.decode(raw)
    redis.call('HDEL', holds_key, request_id)
    redis.call('ZREM', holdexp_key, request_id)
    local b = h.b
    local f_bal, f_extra, f_lots, f_used, f_per =
      'b:' .. b, 'x:' .. b, 'l:' .. b, 'u:' .. b, 'p:' .. b
    local kind, charged = 'charge', h.c
    if outcome == 'r' then
      kind, charged = 'refund', 0
      local st = redis.call('HMGET', org_key, f_bal, f_extra, f_lots, f_used, f_per)
      local bal, extra, used = tonumber(st[1] or '0'), tonumber(st[2] or '0'), tonumber(st[4] or '0')
      -- Plan tokens go back only within the period they came from: after a reset they
      -- would have been forfeited anyway.
      if st[5] == h.per then
        bal = bal + h.pp
        used = math.max(0, used - h.c)
      end
      -- Purchased tokens go back to their lot unless it has expired meanwhile.
      local lots = cjson.decode(st[3] or '[]')
      local restored = 0
      for _, t in ipairs(h.lt) do
        local ref, amount, expires = t[1], t[2], t[3]
        if expires == 0 or expires > now then
          local found = false
          for _, lot in ipairs(lots) do
            if lot[1] == ref then
              lot[3] = lot[3] + amount
              found = true
              break
            end
          end
          if not found then
            lots[#lots + 1] = {ref, expires, amount}
          end
          restored = restored + amount
        end
      end
      if restored > 0 then
        -- Keep soonest expiry first, never-expiring last.
        table.sort(lots, function(x, y)
          local ex = x[2] == 0 and math.huge or x[2]
          local ey = y[2] == 0 and math.huge or y[2]
          return ex < ey
        end)
        extra = extra + restored
        redis.call('HSET', org_key, f_extra, extra, f_lots, cjson.encode(lots))
      end
      redis.call('HSET', org_key, f_bal, bal, f_used, used)
      if h.ik ~= '' then
        -- Failed requests release their key so that the client's retry is charged normally.
        redis.call('DEL', idem_key)
      end
    elseif h.ik ~= '' then
      redis.call('SET', idem_key, 'd:' .. status, 'KEEPTTL')
    end
    local seq = redis.call('HINCRBY', org_key, 'seq', 1)
    local snap = redis.call('HMGET', org_key, f_bal, f_extra, 'a:' .. b, f_used, f_per)
    redis.call('XADD', stream_key, '*',
      'id', request_id, 'k', kind, 'o', h.o, 'u', h.u, 'f', h.f, 'b', b, 't', charged,
      'bal', snap[1] or '0', 'x', snap[2] or '0', 'a', snap[3] or '0', 'used', snap[4] or '0',
      'per', snap[5] or h.per, 's', seq, 'ts', now, 'rq', request_id, 'st', status,
      'lat', latency, 'm', h.m, 'r', h.r, 'p', h.p, 'ref', '')
    results[j] = charged
  end
end
return results

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
-- no longer exists (already settled, also earlier in the same batch, or swept into an
-- expired_hold charge).
--
-- Cost: the batch's holds are read with one HMGET and removed with one HDEL and one ZREM;
-- each org's seq is read once and written once per call, and each org bucket's snapshot
-- fields are read once (again after a refund, which changes them). Every event still
-- gets its own seq, in batch order, and the same fields as if the requests were settled
-- one by one.
--
-- Audit events are written by audit_event, defined in lua/_prelude.lua (the loader
-- prepends it).

local holds_key, holdexp_key, stream_key = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
-- The event's ts: the caller's own digits when they are a plain integer (the same string
-- Redis would make of the number, without formatting it once per event).
local now_s = string.match(ARGV[1], '^[1-9]%d*$') and ARGV[1] or now
local n = tonumber(ARGV[2])
local unpack = unpack or table.unpack
local results = {}

-- Every hold of the batch in one read (in chunks: unpack has a stack limit).
local ids, raws = {}, {}
for j = 1, n do
  ids[j] = ARGV[3 + 4 * (j - 1)]
end
for from = 1, n, 1000 do
  local upto = math.min(n, from + 999)
  local got = redis.call('HMGET', holds_key, unpack(ids, from, upto))
  for k = 1, upto - from + 1 do
    raws[from + k - 1] = got[k]
  end
end

-- Per org hash: the org's seq, advanced here and written back once at the end (each event
-- still gets its own number, in batch order), and per bucket the snapshot fields of the
-- events, read once; a refund (which changes them) drops its bucket's snapshot.
local orgs, org_order = {}, {}
local settled, seen = {}, {}

for j = 1, n do
  local a = 3 + 4 * (j - 1)
  local request_id, outcome, status, latency = ids[j], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local org_key, idem_key = KEYS[2 + 2 * j], KEYS[3 + 2 * j]
  local raw = raws[j]
  if not raw or seen[request_id] then
    -- Gone, or settled earlier in this batch.
    results[j] = -1
  else
    seen[request_id] = true
    settled[#settled + 1] = request_id
    local h = cjson.decode(raw)
    local b = h.b
    local f_bal, f_extra, f_used, f_per = 'b:' .. b, 'x:' .. b, 'u:' .. b, 'p:' .. b
    local o = orgs[org_key]
    if o == nil then
      o = {seq = false, snaps = {}}
      orgs[org_key] = o
      org_order[#org_order + 1] = org_key
    end
    local kind, charged = 'charge', h.c
    if outcome == 'r' then
      kind, charged = 'refund', 0
      local f_lots = 'l:' .. b
      local st = redis.call('HMGET', org_key, f_bal, f_extra, f_lots, f_used, f_per)
      local bal, extra = tonumber(st[1] or '0'), tonumber(st[2] or '0')
      local used = tonumber(st[4] or '0')
      -- Plan tokens go back only within the period they came from: after a reset they
      -- would have been forfeited anyway.
      if st[5] == h.per then
        bal = bal + h.pp
        used = math.max(0, used - h.c)
      end
      -- Purchased tokens go back to their lot unless it has expired meanwhile.
      local restored = 0
      if h.lt and #h.lt > 0 then
        local lots = cjson.decode(st[3] or '[]')
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
      end
      redis.call('HSET', org_key, f_bal, bal, f_used, used)
      o.snaps[b] = nil
      if h.ik ~= '' then
        -- Failed requests release their key so that the client's retry is charged normally.
        redis.call('DEL', idem_key)
      end
    elseif h.ik ~= '' then
      redis.call('SET', idem_key, 'd:' .. status, 'KEEPTTL')
    end
    local snap = o.snaps[b]
    if snap == nil then
      snap = redis.call('HMGET', org_key, f_bal, f_extra, 'a:' .. b, f_used, f_per, 'seq')
      if not o.seq then
        o.seq = tonumber(snap[6] or '0')
      end
      snap[1], snap[2], snap[3], snap[4] =
        snap[1] or '0', snap[2] or '0', snap[3] or '0', snap[4] or '0'
      o.snaps[b] = snap
    end
    local seq = o.seq + 1
    o.seq = seq
    audit_event(stream_key,
      request_id, kind, h.o, h.u, h.f, b, charged,  -- id, k, o, u, f, b, t
      snap[1], snap[2], snap[3], snap[4], snap[5] or h.per, seq, now_s,  -- bal .. ts
      request_id, status, latency, h.m, h.r, h.p, '')  -- rq, st, lat, m, r, p, ref
    results[j] = charged
  end
end

for _, org_key in ipairs(org_order) do
  redis.call('HSET', org_key, 'seq', orgs[org_key].seq)
end
for from = 1, #settled, 1000 do
  local upto = math.min(#settled, from + 999)
  redis.call('HDEL', holds_key, unpack(settled, from, upto))
  redis.call('ZREM', holdexp_key, unpack(settled, from, upto))
end
return results

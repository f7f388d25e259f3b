-- settle.lua: turn holds into charges or refunds and write one audit event per request.
-- Called after responses end, batched: every settle of one shard issued in the same event
-- loop tick goes in one call (all keys share the shard's hash tag). On a single Redis (never
-- a cluster: the keys of several shards are in several slots) one call may carry the
-- batches of several shards, as groups (the multi-shard form, at the end of this header).
--
-- KEYS[1]  shard holds hash    KEYS[2]  shard hold-expiry zset    KEYS[3]  shard events stream
-- then per item j (1-based): KEYS[2 + 2j] org state hash, KEYS[3 + 2j] idempotency key
--          (the hold's own key, or a never-written placeholder; for a reservation settled
--          through the reservation API, the key its result is kept under)
--
-- ARGV[1]  now (ms)    ARGV[2]  number of items N
-- then per item: request id, outcome, upstream status ("" = none, "0" = connection error),
--          latency (ms, "" = none); the outcome is "c" (charge the hold) or "r" (refund
--          it), and those items have these 4 values only (the fixed-cost path). Outcome
--          "C" (charge) or "R" (refund) is an extended item, 3 more values:
--            usage    the actual and the usage event fields (gateway/core/events.py) in one
--                     value, "<actual> <cs> <um> <ui> <uc> <uo> <ur> <mdl>": tokens to
--                     charge instead of the hold, cost source, usage missing ("1" or ""),
--                     uncached input, cached input, output and reasoning tokens, and the
--                     model last (it may hold spaces); each "" when none. The whole value
--                     is "" for an item with neither (a fixed cost's stored response).
--                     One value rather than eight: each argument costs Redis ~950
--                     instructions to parse and hand to Lua, the split ~4,000 in all
--                     (BENCHMARKS.md, "The variable-cost settle").
--            response what a repeat of the request's Idempotency-Key gets (R... or X...,
--                     see gateway/metering/admission.py StoredResponse; "" = the status)
--            org      for a reservation settled through the reservation API: the caller's
--                     org ("" otherwise). Only a reservation of that org is settled.
--          Outcome "a" charges the usage value's actual like "C", for a caller that does
--          not wait for the answer and has no response to keep (the middleware's settle of
--          a variable cost): 1 more value (usage) only, and it answers as a "c" item.
-- Charging an actual A against a hold of c tokens: A = c is a charge of the hold. A < c
-- gives back c - A, taken back in the reverse order of spending (purchased lots first,
-- then plan tokens, these only within the period they came from), exactly as a refund
-- gives back the whole hold. A > c takes A - c more from what is left (plan tokens, then
-- purchased lots soonest expiry first, expired lots skipped); what cannot be covered is
-- the overage: recorded in the event (ov), never taken (no balance goes below zero). The
-- event's t is the net tokens taken, A minus the overage. A reservation's actual is capped
-- by the feature's max (hold field mx).
--
-- Returns an array of N values. A "c"/"r"/"a" item: the tokens charged (0 for a refund),
-- or -1 when the hold no longer exists (already settled, also earlier in the same batch, or
-- swept into an expired_hold charge). A "C"/"R" item: {charged, refunded, overage,
-- remaining, reserved} (remaining: the bucket's plan and purchased tokens after), or -1
-- when the hold is gone; for a reservation item instead the stored result (JSON, see
-- gateway/metering/reservations.py) when it was settled, released or expired before, -1
-- when nothing is known of it, -2 when the hold is not a reservation of that org. An
-- extended item whose usage value does not have that form (a gateway bug) is not settled:
-- -1, its hold left to expire into a charge at its reserve, as a settle that never came.
--
-- The multi-shard form (gateway/metering/settlement.py encode_many): ARGV[2] is "*", and
-- KEYS and ARGV hold groups, each one shard's batch as the single form above has it:
--   KEYS     group 1's 3 shard keys and 2 keys per item, then group 2's, ...
--   ARGV[1]  now (ms, shared)   ARGV[2]  "*"
--   then per group: its number of items N_g, then its items' values as above.
-- Returns one entry per group, in order: the group's array of N_g values as above, or an
-- error reply when its settling raised an error (a pcall per group: what it wrote before
-- the error stays, as with a single-form call that fails, and the other groups are
-- settled all the same). Each group is settled exactly as a single-form call of its own
-- would settle it, in the same order: the same writes and the same stream entries.
--
-- Levels (contract A10): a hold that drew from team, user or key caps lists their caps
-- (hold field lx, or lv in holds written before: lua/charge.lua; the counters are named
-- from the hold's b, tm, u and key). A charge of the hold (the common case) leaves the
-- counters as charge.lua set them and never reads lx. A refund gives the hold back to
-- every one of them, an actual below the hold gives back the difference, both only to
-- counters still in the hold's period (a reset already forgot them). An actual above the hold takes the extra from the org only
-- as far as every level's cap (as recorded in the hold) leaves room: a cap is a balance of
-- its own, so like the org's balance it is never exceeded, and what a level cannot cover
-- is overage as well (ov), never taken. Every level is moved by the same net tokens as
-- the org, so at every moment a level's counter is the sum of what its requests were
-- charged this period.
--
-- Cost: the batch's holds are read with one HMGET and removed with one HDEL and one ZREM;
-- each org's seq is read once and written once per call, and each org bucket's snapshot
-- fields are read once; a refund or an actual other than the hold, which changes them,
-- leaves the new ones from what it read and wrote (snapshot_after). Every event still
-- gets its own seq, in batch order, and the same fields as if the requests were settled
-- one by one.
--
-- Audit events are written by audit_event (with the usage fields or without), defined in
-- lua/_prelude.lua (the loader prepends it). A hold with capped levels adds their figures
-- after the event (level_figures, also in the prelude), which the sync job's cap alerts
-- read: a charge of the hold passes on the counters as its charge left them (the hold's
-- lf, nothing read), an event that moved them reads them again; holds without levels pay
-- nothing for it.

local now = tonumber(ARGV[1])
-- The event's ts: the caller's own digits when they are a plain integer (the same string
-- Redis would make of the number, without formatting it once per event).
local now_s = string.match(ARGV[1], '^[1-9]%d*$') and ARGV[1] or now
local unpack = unpack or table.unpack
local match = string.match

-- A group's n items from ARGV[a] on: each one's request id and where its values start,
-- and where the next group starts (the values' count depends on the outcome).
local function items_of(a, n)
  local ids, starts = {}, {}
  for j = 1, n do
    ids[j], starts[j] = ARGV[a], a
    local outcome = ARGV[a + 1]
    if outcome == 'c' or outcome == 'r' then
      a = a + 4
    elseif outcome == 'a' then
      a = a + 5
    else
      a = a + 7
    end
  end
  return ids, starts, a
end

-- Purchased lots, soonest expiry first and never-expiring last (every writer keeps it).
local function lot_order(x, y)
  local ex = x[2] == 0 and math.huge or x[2]
  local ey = y[2] == 0 and math.huge or y[2]
  return ex < ey
end

-- After give_back or take_more changed bucket b: its snapshot fields for the events (as
-- the main loop would read them again: b x a u p, each "0" when unset, and p nil) from
-- what the function read (st: b x l u p a seq) and the values it wrote (extra nil:
-- unchanged), and the org's seq when not known yet. One HMGET less per event that moved
-- a balance (a refund, an actual other than the hold): the values are those just
-- written with HSET, which Redis turns into the same strings for the event.
local function snapshot_after(o, b, st, bal, extra, used)
  if not o.seq then o.seq = tonumber(st[7] or '0') end
  o.snaps[b] = {bal, extra or st[2] or '0', st[6] or '0', used, st[5]}
end

-- Give tokens of hold h back to its bucket: plan_back plan tokens (only within the period
-- they came from: after a reset they would have been forfeited anyway) and lots_back
-- ([[reference, n, expires_ms], ...]) to their lots unless expired; used drops by
-- used_back (same period only). Leaves the bucket's snapshot after it in o (see
-- snapshot_after).
local function give_back(org_key, h, plan_back, lots_back, used_back, o)
  local b = h.b
  local f_bal, f_extra, f_used, f_per, f_lots = 'b:' .. b, 'x:' .. b, 'u:' .. b, 'p:' .. b, 'l:' .. b
  local st = redis.call('HMGET', org_key, f_bal, f_extra, f_lots, f_used, f_per, 'a:' .. b, 'seq')
  local bal, extra = tonumber(st[1] or '0'), tonumber(st[2] or '0')
  local used = tonumber(st[4] or '0')
  if st[5] == h.per then
    bal = bal + plan_back
    used = math.max(0, used - used_back)
  end
  local restored = 0
  if lots_back and #lots_back > 0 then
    local lots = cjson.decode(st[3] or '[]')
    for _, t in ipairs(lots_back) do
      local ref, amount, expires = t[1], t[2], t[3]
      if amount > 0 and (expires == 0 or expires > now) then
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
      table.sort(lots, lot_order)
      extra = extra + restored
      redis.call('HSET', org_key, f_extra, extra, f_lots, cjson.encode(lots))
    end
  end
  redis.call('HSET', org_key, f_bal, bal, f_used, used)
  snapshot_after(o, b, st, bal, restored > 0 and extra or nil, used)
end

-- Take `more` tokens beyond hold h from what is left in its bucket: plan tokens, then
-- purchased lots soonest expiry first (expired lots are left for charge.lua to drop with
-- their grant_expired event). Returns what could not be covered; leaves the bucket's
-- snapshot after it in o (see snapshot_after).
local function take_more(org_key, h, more, o)
  local b = h.b
  local f_bal, f_extra, f_used, f_lots = 'b:' .. b, 'x:' .. b, 'u:' .. b, 'l:' .. b
  local st = redis.call('HMGET', org_key, f_bal, f_extra, f_lots, f_used, 'p:' .. b, 'a:' .. b,
    'seq')
  local bal, extra = tonumber(st[1] or '0'), tonumber(st[2] or '0')
  local used = tonumber(st[4] or '0')
  local from_plan = math.min(bal, more)
  local rest = more - from_plan
  if rest > 0 and extra > 0 then
    local lots, kept, from_lots = cjson.decode(st[3] or '[]'), {}, 0
    for _, lot in ipairs(lots) do
      if rest > 0 and not (lot[2] > 0 and lot[2] <= now) then
        local k = math.min(lot[3], rest)
        lot[3] = lot[3] - k
        rest = rest - k
        from_lots = from_lots + k
      end
      if lot[3] > 0 then kept[#kept + 1] = lot end
    end
    if from_lots > 0 then
      extra = extra - from_lots
      redis.call('HSET', org_key, f_extra, extra, f_lots, #kept > 0 and cjson.encode(kept) or '[]')
    else
      extra = nil
    end
  else
    extra = nil
  end
  bal, used = bal - from_plan, used + (more - rest)
  redis.call('HSET', org_key, f_bal, bal, f_used, used)
  snapshot_after(o, b, st, bal, extra, used)
  return rest
end

-- The levels' counters of hold h (field lx), in the hold's period, as {field, cap, used}.
-- lx is "<team cap> <user cap> <key cap>" in hexadecimal ("-": that level is not capped),
-- then the key when its level is capped; the counters are named from the hold's bucket,
-- team (tm), user (u) and that key. Holds written before have lv instead: the same in
-- decimal (the key in k when it is not there), or [[counter field, cap], ...]. A counter
-- is a hexadecimal integer of the period in the bucket's Lp (see lua/charge.lua,
-- "Levels"): one of another period was reset and is left alone. Without Lp (an org not
-- charged since counters were "<used>@<period>", decimal) the value names its own.
local function levels_of(org_key, h)
  local names, caps, out = {}, {}, {}
  local lv, base = h.lx, 16
  if not lv then lv, base = h.lv, 10 end
  if type(lv) == 'table' then
    for k, l in ipairs(lv) do names[k], caps[k] = l[1], l[2] end
  else
    local t, u, k, key = string.match(lv, '^(%S+) (%S+) (%S+) ?(.*)$')
    if key == '' then key = h.k end
    local prefix = 'Ln:' .. h.b .. ':'
    if t ~= '-' then
      names[#names + 1], caps[#caps + 1] = prefix .. 't:' .. h.tm, tonumber(t, base)
    end
    if u ~= '-' then
      names[#names + 1], caps[#caps + 1] = prefix .. 'u:' .. h.u, tonumber(u, base)
    end
    if k ~= '-' then
      names[#names + 1], caps[#caps + 1] = prefix .. 'k:' .. key, tonumber(k, base)
    end
  end
  names[#names + 1] = 'Lp:' .. h.b
  local got = redis.call('HMGET', org_key, unpack(names))
  local lp = got[#names]
  if lp and lp ~= h.per then return out, true end
  for j = 1, #names - 1 do
    local v = got[j]
    if v then
      local used = lp and tonumber(v, 16)
      if not used then
        -- "<used>@<period>": written before Lp, or by a process not yet upgraded.
        local u, p = string.match(v, '^(%d+)@(.*)$')
        if p == h.per then used = tonumber(u) end
      end
      if used then out[#out + 1] = {names[j], caps[j], used} end
    end
  end
  return out, lp ~= nil
end

-- Move every level counter of hold h by delta tokens (never below zero).
local function levels_move(org_key, h, delta)
  if not (h.lx or h.lv) or delta == 0 then return end
  local set = {}
  local levels, current = levels_of(org_key, h)
  for _, l in ipairs(levels) do
    set[#set + 1] = l[1]
    if current then
      set[#set + 1] = string.format('%x', math.max(0, l[3] + delta))
    else
      set[#set + 1] = string.format('%d@%s', math.max(0, l[3] + delta), h.per)
    end
  end
  if #set > 0 then redis.call('HSET', org_key, unpack(set)) end
end

-- How many more tokens every level of hold h still allows (nil: no level).
local function levels_room(org_key, h)
  if not (h.lx or h.lv) then return nil end
  local room = nil
  for _, l in ipairs(levels_of(org_key, h)) do
    local r = math.max(0, l[2] - l[3])
    if room == nil or r < room then room = r end
  end
  return room
end

-- One shard's batch (a group): its keys from KEYS[kb + 1] on, its n items' ids and where
-- their values start (items_of). Returns the group's array of replies (see the header).
-- The chunk's values and functions it uses come as parameters (the two calls below), not
-- as upvalues: each upvalue costs every call an object to create, close and collect, ~3.3 k
-- instructions per call for these ten (callgrind; BENCHMARKS.md section 1, "Round 7").
local function settle_group(kb, n, ids, starts, now, now_s, unpack, match,
    give_back, take_more, levels_move, levels_room, level_figures, audit_event)
  local holds_key, holdexp_key, stream_key = KEYS[kb + 1], KEYS[kb + 2], KEYS[kb + 3]
  local results = {}

  -- Every hold of the batch in one read (in chunks: unpack has a stack limit).
  local raws = {}
  for from = 1, n, 1000 do
    local upto = math.min(n, from + 999)
    local got = redis.call('HMGET', holds_key, unpack(ids, from, upto))
    for k = 1, upto - from + 1 do
      raws[from + k - 1] = got[k]
    end
  end

  -- Per org hash: the org's seq, advanced here and written back once at the end (each event
  -- still gets its own number, in batch order), and per bucket the snapshot fields of the
  -- events, read once; a refund or an actual other than the hold (which change them) leave
  -- the bucket's snapshot after them (snapshot_after).
  local orgs, org_order = {}, {}
  local settled, seen = {}, {}

  for j = 1, n do
    local a = starts[j]
    local request_id, outcome, status, latency = ids[j], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
    local org_key, idem_key = KEYS[kb + 2 + 2 * j], KEYS[kb + 3 + 2 * j]
    local raw = raws[j]
    local extended = outcome ~= 'c' and outcome ~= 'r'
    -- An extended item's actual and usage fields (nil past cs when it has none).
    local rsv_org, actual, cs, um, ui, uc, uo, ur, mdl = '', '', ''
    if extended then
      local usage = ARGV[a + 4]
      if usage ~= '' then
        actual, cs, um, ui, uc, uo, ur, mdl =
          match(usage, '^(%d*) (%S*) (1?) (%d*) (%d*) (%d*) (%d*) (.*)$')
        if not actual then
          raw = nil  -- malformed: left alone (see the header)
        end
      end
      if outcome ~= 'a' then rsv_org = ARGV[a + 6] end
    end
    local h = nil
    if raw and not seen[request_id] then
      h = cjson.decode(raw)
      if rsv_org ~= '' and (h.v == nil or h.o ~= rsv_org) then
        h = false
      end
    end
    if not h then
      if h == false then
        -- Not a reservation of the caller's org: left as it is.
        results[j] = -2
      elseif rsv_org ~= '' then
        -- Gone: the result kept when it was settled, released or expired (or nothing).
        results[j] = redis.call('GET', idem_key) or -1
      else
        -- Gone, or settled earlier in this batch.
        results[j] = -1
      end
    else
      seen[request_id] = true
      settled[#settled + 1] = request_id
      local b = h.b
      local o = orgs[org_key]
      if o == nil then
        o = {seq = false, snaps = {}}
        orgs[org_key] = o
        org_order[#org_order + 1] = org_key
      end
      local kind, charged, overage = 'charge', h.c, 0
      local moved = false  -- the levels' counters changed here (their figures are read again)
      if rsv_org ~= '' and h.e and h.e <= now then
        -- A reservation past its expiry is charged its reserve, as the sweep would have.
        kind, actual, status, latency = 'expired_hold', '', '', now - h.t0
      elseif outcome == 'r' or outcome == 'R' then
        kind, charged = 'refund', 0
        give_back(org_key, h, h.pp, h.lt, h.c, o)
        levels_move(org_key, h, -h.c)
        moved = true
        if h.ik ~= '' then
          -- Failed requests release their key so that the client's retry is charged normally.
          redis.call('DEL', idem_key)
        end
      else
        if actual ~= '' then
          charged = math.max(0, tonumber(actual))
          if h.mx and charged > h.mx then charged = h.mx end
          if charged < h.c then
            -- The actual is what the hold's first tokens paid: plan tokens, then lots in the
            -- order they were taken; the rest goes back.
            local plan_used = math.min(h.pp, charged)
            local rest = charged - plan_used
            local lots_back = {}
            if h.lt then
              for _, t in ipairs(h.lt) do
                local k = math.min(t[2], rest)
                rest = rest - k
                lots_back[#lots_back + 1] = {t[1], t[2] - k, t[3]}
              end
            end
            give_back(org_key, h, h.pp - plan_used, lots_back, h.c - charged, o)
            levels_move(org_key, h, charged - h.c)
            moved = true
          elseif charged > h.c then
            local more = charged - h.c
            local allowed = levels_room(org_key, h) or more
            if allowed > more then allowed = more end
            -- (Nothing allowed: nothing moved, the snapshot in o stays true.)
            local uncovered = allowed > 0 and take_more(org_key, h, allowed, o) or 0
            levels_move(org_key, h, allowed - uncovered)
            moved = true
            overage = more - allowed + uncovered
            charged = charged - overage
          end
        end
        if h.ik ~= '' then
          local response = (extended and outcome ~= 'a') and ARGV[a + 5] or ''
          if response == '' then response = 'd:' .. status end
          redis.call('SET', idem_key, (h.fp and ('F' .. h.fp) or '') .. response, 'KEEPTTL')
        end
      end
      local snap = o.snaps[b]
      if snap == nil then
        snap = redis.call('HMGET', org_key, 'b:' .. b, 'x:' .. b, 'a:' .. b, 'u:' .. b, 'p:' .. b,
          'seq')
        if not o.seq then
          o.seq = tonumber(snap[6] or '0')
        end
        snap[1], snap[2], snap[3], snap[4] =
          snap[1] or '0', snap[2] or '0', snap[3] or '0', snap[4] or '0'
        o.snaps[b] = snap
      end
      local seq = o.seq + 1
      o.seq = seq
      -- The capped levels' figures after this event, for the cap alerts (nil: none).
      local lvf = nil
      if h.lx then lvf = level_figures(moved and org_key or nil, h, snap[5] or h.per) end
      if extended and (cs ~= '' or actual ~= '') then
        -- A reservation settled past its expiry: the app's actual came too late to count,
        -- so its row says usage missing, as the sweep's would (lua/sweep_holds.lua).
        if kind == 'expired_hold' then
          mdl, ui, uc, uo, ur, um = '', '', '', '', '', '1'
        end
        audit_event(stream_key,
          request_id, kind, h.o, h.u, h.f, b, charged,  -- id, k, o, u, f, b, t
          snap[1], snap[2], snap[3], snap[4], snap[5] or h.per, seq, now_s,  -- bal .. ts
          request_id, status, latency, h.m, h.r, h.p, '',  -- rq, st, lat, m, r, p, ref
          h.c, overage > 0 and overage or '', mdl, ui, uc, uo, ur, cs, um, h.tm, lvf)  -- rs .. lv
      else
        audit_event(stream_key,
          request_id, kind, h.o, h.u, h.f, b, charged,  -- id, k, o, u, f, b, t
          snap[1], snap[2], snap[3], snap[4], snap[5] or h.per, seq, now_s,  -- bal .. ts
          request_id, status, latency, h.m, h.r, h.p, '',  -- rq, st, lat, m, r, p, ref
          nil, nil, nil, nil, nil, nil, nil, nil, nil, h.tm, lvf)  -- no usage fields; tm, lv
      end
      if not extended or outcome == 'a' then
        results[j] = charged
      else
        local refunded = math.max(0, h.c - charged - overage)
        if kind == 'refund' then refunded = h.c end
        local remaining = tonumber(snap[1]) + tonumber(snap[2])
        if rsv_org ~= '' then
          local outcome_name = kind == 'refund' and 'released'
            or (kind == 'expired_hold' and 'expired' or 'settled')
          local result = cjson.encode({id = request_id, reserved = h.c, charged = charged,
            refunded = refunded, overage = overage, remaining = remaining,
            outcome = outcome_name})
          redis.call('SET', idem_key, result, 'PX', h.v)
          results[j] = result
        else
          results[j] = {charged, refunded, overage, remaining, h.c}
        end
      end
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
end

if ARGV[2] ~= '*' then
  -- The single form: one shard's batch (errors are the call's own).
  local n = tonumber(ARGV[2])
  local ids, starts = items_of(3, n)
  return settle_group(0, n, ids, starts, now, now_s, unpack, match,
    give_back, take_more, levels_move, levels_room, level_figures, audit_event)
end

-- The multi-shard form. Every group is located before any is settled: a malformed call
-- fails here, having written nothing.
local groups, a, kb = {}, 3, 0
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  local ids, starts, after = items_of(a + 1, n)
  groups[#groups + 1] = {kb, n, ids, starts}
  kb, a = kb + 3 + 2 * n, after
end
local replies = {}
for g, group in ipairs(groups) do
  local ok, got = pcall(settle_group, group[1], group[2], group[3], group[4], now, now_s,
    unpack, match, give_back, take_more, levels_move, levels_room, level_figures, audit_event)
  if ok then
    replies[g] = got
  else
    -- redis.call's error (a string, or a table with err in later Redis versions) or Lua's
    -- own, as an error reply with a code first, as a failed single-form call answers.
    local message = type(got) == 'table' and got.err or tostring(got)
    if not match(message, '^%u+ ') then message = 'ERR ' .. message end
    replies[g] = {err = message}
  end
end
return replies

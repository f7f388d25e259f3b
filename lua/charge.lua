-- charge.lua: admit one metered request and hold its tokens (the hot path; one call per
-- request, nothing else touches the network before the upstream call).
--
-- KEYS[1]   org state hash          P:{sN}:org:<org>
-- KEYS[2]   shard holds hash        P:{sN}:holds
-- KEYS[3]   shard hold-expiry zset  P:{sN}:holdexp
-- KEYS[4]   shard events stream     P:{sN}:events   (reset and grant_expired events)
-- KEYS[5]   idempotency key         P:{sN}:idem:<org>:<sha256>, or a never-written placeholder
-- KEYS[6..] per-user rate-limiter keys, referenced by index from the limiter specs in ARGV
--
-- ARGV[1]  now (ms)             ARGV[2]  period id          ARGV[3]  refresh_at (ms)
--          (per-org periods, contract A12: ARGV[2] is "<period id> <anchor>", the anchor
--          the caller computed the period from; "" = calendar periods)
-- ARGV[4]  bucket               ARGV[5]  cost (tokens)      ARGV[6]  request id
-- ARGV[7]  hold expiry (ms)     ARGV[8]  idempotency ttl (ms; 0 = no Idempotency-Key)
-- ARGV[9]  org                  ARGV[10] user ("" = none)   ARGV[11] feature
-- ARGV[12] method               ARGV[13] route template
-- ARGV[14] API key id ("" = none) ARGV[15] the request's team ("" = none: a JWT claim or
--          the middleware's scope; an API key's own team, from the org hash, comes first)
-- ARGV[16] number of plans P, then P groups of:
--            plan name, allocation of this bucket (-1 = not in the plan), the plan's
--            default caps for this bucket ("" = none, else "<team>,<user>,<key>" in tokens,
--            -1 = no default at that level), limiter count L, then L triples: KEYS index, count, period (ms). KEYS index 0 = a per-org
--            limiter, kept in the org hash as field rl:o:<count>/<period> (no key of its
--            own: one HMGET and one HSET serve the org's state and its limiters).
-- then, optionally: the caller's levels as its template caches them (contract A10; see
--          "Levels" below): "<version> <plan>", the org's levels version (field lv, always
--          "v...": neither "" nor hex, so not a fingerprint) and plan they were resolved
--          for, the team ("" = none), then the caps of team, user and key in tokens,
--          hexadecimal ("-" = none)
-- then, optionally (absent on the fixed-cost path: nothing to read, nothing to write):
--          the request's fingerprint (64 hex digits of sha256 over what makes it the same
--          request, or "" for none), then, for a reservation (DESIGN A9) only: how long its
--          settle result is kept (ms), the key it is kept under (P:{sN}:rsv:<org>:<id>),
--          and the most it can be settled at (the feature's max).
--
-- Returns one of:
--   {"ok", remaining, limit, limit_remaining, limit_reset_ms}  (limit = -1: no limiter)
--                               followed, when the levels were read in full, by the 5
--                               values of the levels group for the caller to cache (see
--                               "Levels" below)
--   {"missing"}                 no state for this org: seed it (seed.lua), then call again
--   {"anchor", anchor}          the org's anchor (field pa) is not the one ARGV[2] assumed:
--                               nothing was written; compute the period again and call again
--   {"not_in_plan", plan}
--   {"rate_limited", retry_after_ms, limit, limit_reset_ms}
--   {"insufficient", remaining, plan}               the org's balance refused
--   {"insufficient", remaining, plan, level, cap, used, org remaining, level id}
--                               a team, user or key cap refused (contract A10)
--   {"in_flight"}               the Idempotency-Key's first request still holds tokens
--   {"replay", status}          the Idempotency-Key already completed ("unknown" if swept)
--   {"replay", "", stored}      ... and settle.lua kept its response (R..., or X... when it
--                               cannot be replayed), or it made a reservation (V...); see
--                               gateway/metering/admission.py (StoredResponse)
--   {"reused"}                  the Idempotency-Key was used for another request (another
--                               fingerprint)
--
-- The Idempotency-Key's state (a string, the idempotency window's TTL): "F" and the
-- fingerprint when the request had one, then "h:<request id>" while its hold is open,
-- "d:<status>" once settled, "R..." / "X..." a stored response (settle.lua), or
-- "V<request id> <reserved> <expires ms> <remaining>" for a reservation (written here at
-- once: reserving completes the request, settling the reservation leaves the key alone).
--
-- Purchased lots live in the org hash as l:<bucket> = JSON [[reference, expires_ms (0 =
-- never), remaining], ...], soonest expiry first, never-expiring last (every writer keeps
-- that order: this script decodes the JSON only when the first lot may have expired or the
-- plan tokens do not cover the cost); x:<bucket> is their sum.
--
-- The hold (HSET holds <request id> <json>) records where the tokens came from so that
-- settle.lua can refund them exactly: {o, u, f, b, c (cost), pp (from plan tokens),
-- lt ([[reference, n, expires_ms], ...] from purchased lots), per (period), rq, t0, m, r,
-- ik (idempotency key or ""), p (plan), s0 (the org's seq when the hold was taken)}, and
-- when they apply: tm (the request's team), lx ("<team cap> <user cap> <key cap>" in
-- hexadecimal, "-" for a level without a cap, then " <API key>" when its level is capped:
-- the caps of the level counters the hold drew from, named Ln:<b>:t:<tm>, Ln:<b>:u:<u>,
-- Ln:<b>:k:<key>; see "Levels" below; holds written before have lv, decimal), lf (with
-- lx: "<team> <user> <key>", those counters as this charge left them, in hexadecimal, "-"
-- for a level without a cap: the cap alerts' figures with lx, which settle.lua and
-- sweep_holds.lua pass on unless they moved the counters, see level_figures in
-- lua/_prelude.lua; counters only, as each character of the hold costs its encoding
-- here and its decoding there), fp (the request's fingerprint, with ik), and for a reservation v (how
-- long its settle result is kept, ms), rk (the key it is kept under), e (its expiry, ms)
-- and mx (the most it can be settled at).
--
-- Audit events are written by audit_event, defined in lua/_prelude.lua (the loader
-- prepends it).

local tonumber, redis_call = tonumber, redis.call
local cjson_encode, cjson_decode = cjson.encode, cjson.decode
local unpack = unpack or table.unpack
local org_key, holds_key, holdexp_key, stream_key, idem_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = tonumber(ARGV[1])
local period = ARGV[2]
-- Per-org periods (contract A12): the anchor comes after the period id, past a space.
local anchor = nil
local anchor_sep = string.find(period, ' ', 1, true)
if anchor_sep then
  anchor = string.sub(period, anchor_sep + 1)
  period = string.sub(period, 1, anchor_sep - 1)
end
local refresh_at = ARGV[3]
local bucket = ARGV[4]
local cost = tonumber(ARGV[5])
local request_id = ARGV[6]
local idem_ttl = tonumber(ARGV[8])
local org, user, feature, method, route = ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local key_id, req_team = ARGV[14], ARGV[15]
local nplans = tonumber(ARGV[16])
local PLANS_AT = 17

-- The org's state and its per-org limiters (KEYS index 0, fields of the org hash) in one
-- read: the org's plan is not known yet, so every plan's per-org limiter fields are read.
local f_bal, f_alloc, f_used, f_per, f_extra, f_lots =
  'b:' .. bucket, 'a:' .. bucket, 'u:' .. bucket, 'p:' .. bucket, 'x:' .. bucket, 'l:' .. bucket
-- lv: whether the org has teams, members or cap overrides (lua/levels.lua sets it).
local fields = {'plan', f_bal, f_per, f_extra, f_lots, f_used, 'seq', 'lv'}
local field_of = {}  -- ARGV index of a per-org limiter spec -> {field, index in the reply}
local i = PLANS_AT
for _ = 1, nplans do
  local n = tonumber(ARGV[i + 3])
  for j = i + 4, i + 3 + 3 * n, 3 do
    if ARGV[j] == '0' then
      local f = 'rl:o:' .. ARGV[j + 1] .. '/' .. ARGV[j + 2]
      fields[#fields + 1] = f
      field_of[j] = {f, #fields}
    end
  end
  i = i + 4 + 3 * n
end
local anchor_at = nil  -- the org's anchor field pa, read with its state (per-org periods)
if anchor then
  fields[#fields + 1] = 'pa'
  anchor_at = #fields
end
-- The caller's levels as its template caches them (5 values from a version, "v...", on;
-- absent until a charge of this caller reported them, see "Levels" below): their counters
-- are read with the org's state.
local cached, counters_at, tn, un, kn = nil, nil, nil, nil, nil
do
  local a = ARGV[i]
  if a and string.byte(a, 1) == 118 then
    cached = i  -- "<version> <plan>", team, team cap, user cap, key cap
    i = i + 5
    local p = 'Ln:' .. bucket .. ':'
    tn, un, kn = p .. 't:' .. ARGV[cached + 1], p .. 'u:' .. user, p .. 'k:' .. key_id
    local n = #fields
    fields[n + 1], fields[n + 2], fields[n + 3] = tn, un, kn
    counters_at = n + 1
  end
end
-- The optional arguments after the plans (nil when absent).
local fingerprint, reservation = ARGV[i], ARGV[i + 1]
if fingerprint == '' then fingerprint = nil end

-- Idempotency first: a replay must consume neither rate nor tokens.
if idem_ttl > 0 then
  local state = redis_call('GET', idem_key)
  if state then
    if string.byte(state, 1) == 70 then
      -- "F<fingerprint>": the same key with another request is refused, whatever its state.
      if fingerprint and string.sub(state, 2, 65) ~= fingerprint then
        return {'reused'}
      end
      state = string.sub(state, 66)
    end
    local tag = string.sub(state, 1, 2)
    if tag == 'h:' then
      -- A hold swept by the sync job leaves its key behind: it is no longer in flight.
      if redis_call('HEXISTS', holds_key, string.sub(state, 3)) == 1 then
        return {'in_flight'}
      end
      return {'replay', 'unknown'}
    end
    if tag == 'd:' then
      return {'replay', string.sub(state, 3)}
    end
    return {'replay', '', state}
  end
end

local st = redis_call('HMGET', org_key, unpack(fields))
local plan = st[1]
if not plan then
  return {'missing'}
end
if anchor_at and (st[anchor_at] or '') ~= anchor then
  return {'anchor', st[anchor_at] or ''}
end

-- The caller passes every plan's allocation and limiters; pick the org's own, so a plan
-- change applies at once without an extra round trip.
local alloc, plan_caps, lim_at, nlim = nil, '', 0, 0
i = PLANS_AT
for _ = 1, nplans do
  local n = tonumber(ARGV[i + 3])
  if ARGV[i] == plan then
    alloc, plan_caps, lim_at, nlim = tonumber(ARGV[i + 1]), ARGV[i + 2], i + 4, n
  end
  i = i + 4 + 3 * n
end
if alloc == nil or alloc < 0 then
  return {'not_in_plan', plan}
end

-- Rate limits: GCRA, one theoretical arrival time (ms) per limiter: a field of the org
-- hash (per org) or a key (per user). A burst of `count` is allowed; nothing is written
-- unless every limiter passes.
local limit, limit_remaining, limit_reset = -1, -1, 0
local tats = {}      -- per-user limiters to SET: {key, new_tat}
local org_tats = {}  -- per-org limiters: field, value, ... (HSET with the org state)
for j = 0, nlim - 1 do
  local a = lim_at + 3 * j
  local idx = ARGV[a]
  local count = tonumber(ARGV[a + 1])
  local per = tonumber(ARGV[a + 2])
  local interval = per / count
  local key, tat
  if idx == '0' then
    local f = field_of[a]
    key = f[1]
    tat = tonumber(st[f[2]] or '0')
  else
    key = KEYS[tonumber(idx)]
    tat = tonumber(redis_call('GET', key) or '0')
  end
  if tat < now then tat = now end
  local new_tat = tat + interval
  local over = new_tat - now - per
  if over > 0 then
    return {'rate_limited', math.ceil(over), count, math.ceil(tat - now)}
  end
  if idx == '0' then
    org_tats[#org_tats + 1] = key
    org_tats[#org_tats + 1] = string.format('%.3f', new_tat)
  else
    tats[#tats + 1] = {key, new_tat}
  end
  local remaining = math.floor((per - (new_tat - now)) / interval + 1e-9)
  if limit_remaining < 0 or remaining < limit_remaining then
    limit, limit_remaining, limit_reset = count, remaining, math.ceil(new_tat - now)
  end
end
for _, t in ipairs(tats) do
  redis_call('SET', t[1], string.format('%.3f', t[2]), 'PX', math.ceil(t[2] - now) + 1000)
end

local bal = tonumber(st[2] or '0')
local extra = tonumber(st[4] or '0')
local used = tonumber(st[6] or '0')
-- The org's sequence number when the hold is taken (s0 in the hold): snapshots written by
-- events with seq < s0 already include this hold's deduction, later ones do not.
local seq_now = tonumber(st[7] or '0')

-- A reset or grant_expired event (audit_event: lua/_prelude.lua).
local function emit(kind, tokens, seq, ref)
  audit_event(stream_key,
    -- id, k, o, u, f, b, t
    kind .. ':' .. request_id .. ':' .. bucket .. (ref ~= '' and (':' .. ref) or ''),
    kind, org, '', '', bucket, tokens,
    -- bal, x, a, used, per, s, ts
    bal, extra, redis_call('HGET', org_key, f_alloc) or '0', used, period, seq, now,
    -- rq, st, lat, m, r, p, ref
    request_id, '', '', '', '', plan, ref)
end

-- Lazy period reset: unused plan tokens do not roll over; purchased tokens are untouched.
if st[3] ~= period then
  local before = bal
  bal, used = alloc, 0
  local seq = redis_call('HINCRBY', org_key, 'seq', 1)
  seq_now = seq
  redis_call('HSET', org_key, f_bal, bal, f_alloc, alloc, f_used, 0, f_per, period,
    'rf:' .. bucket, refresh_at)
  emit('reset', before - bal, seq, '')
end

-- Purchased lots, soonest expiry first (never-expiring last); drop the expired ones.
-- Decoding the lots JSON is skipped while nothing in it can have expired: lots are kept
-- soonest expiry first, so the first lot's expiry (read by a pattern that only matches a
-- reference free of quotes and escapes) is the earliest; anything else is decoded.
local lots_raw = st[5] or '[]'
local lots = nil
if extra > 0 then
  local first = string.match(lots_raw, '^%[%[%s*"[^"\\]*"%s*,%s*(%d+)%s*,')
  first = first and tonumber(first)
  if first == nil or (first > 0 and first <= now) then
    lots = cjson_decode(lots_raw)
  end
end
if lots then
  local kept, expired = {}, 0
  for _, lot in ipairs(lots) do
    if lot[2] > 0 and lot[2] <= now then
      expired = expired + lot[3]
    else
      kept[#kept + 1] = lot
    end
  end
  if expired > 0 then
    lots = kept
    extra = extra - expired
    local seq = redis_call('HINCRBY', org_key, 'seq', 1)
    seq_now = seq
    redis_call('HSET', org_key, f_extra, extra, f_lots, #lots > 0 and cjson_encode(lots) or '[]')
    emit('grant_expired', expired, seq, '')
  end
end

if bal + extra < cost then
  -- A refused request still counts against the rate limits.
  if #org_tats > 0 then
    redis_call('HSET', org_key, unpack(org_tats))
  end
  return {'insufficient', bal + extra, plan}
end

-- Levels (contract A10): the request's team, user and API key may each have a cap on what
-- they draw from this bucket per period: an override in the org hash (Lc:<bucket>:<l>:<id>,
-- "N" tokens or "p<hundredths of a percent>" of the allocation) or the plan's default
-- (ARGV). Each capped level counts what it drew in Ln:<bucket>:<l>:<id>, a hexadecimal
-- integer, in the period in Lp:<bucket> (field names: gateway/core/caps.py). Checked broadest first
-- (team, user, key) after the org's balance; all are charged together with the org, or
-- none is. An org without levels (no lv) on a plan without default caps skips all of this.
--
-- lv is the org's levels version: every change of its teams, members or overrides
-- (lua/levels.lua, lua/seed.lua) and every reset of its counters (below) writes a new one.
-- Two ways to a level's team and cap:
-- * cached: the caller's template carries them (ARGV: "<version> <plan>" they were
--   resolved for, the team, the caps of team, user and key) and the counters were read
--   with the org's state. Used only while lv and the org's plan are still those: anything
--   else (an admin change on any process, a plan change, a reset, a re-seed) takes the full
--   read below in this same call, so a stale cache can never admit what the current caps
--   refuse. A version also implies the period of the counters: Lp changes only with a new
--   one, and templates are per period.
-- * full read: first the lazy reset (Lp is not this period: every counter of another
--   period goes, one of this period in the older "<used>@<period>" form becomes
--   hexadecimal), then one HMGET
--   for the key's and the user's team and the caps and counters of the request's team,
--   user and key, and a second one for the team's when the team is not the request's (the
--   key's own or the user's, known only after the first). An admitted request then returns
--   what it resolved (after the "ok" reply's 5 values: "<version> <plan>", team, caps) for
--   the caller to cache.
-- Measured (bench/lua_instructions.py, BENCHMARKS.md "Team/user/key caps"): the cached way
-- saves the membership and cap lookups, the second HMGET and the names of 8 fields; a
-- hexadecimal counter saves parsing "@<period>" and strtod. Each ARGV value costs Redis
-- ~1.3k instructions, so the group has only what cannot be built here for less.
local room = bal + extra - cost  -- what the request leaves; the tightest level lowers it
local lv_hold, lf_hold, team, learned = nil, nil, nil, nil
if st[8] or plan_caps ~= '' then
  local ntats = #org_tats  -- the limiters only: a refusal writes no level counter
  -- Up to three times per request, so written for Lua 5.1's costs (measured: see
  -- BENCHMARKS.md, "Team/user/key caps"): library functions as locals, no closure made on
  -- the cached way. Counters and the caps passed in ARGV are hexadecimal: tonumber(s, 16)
  -- is the C library's strtoul, half the cost of tonumber(s), which is strtod; integers
  -- become strings through string.format('%x') (Lua's own conversion and '%.0f' go
  -- through the C library's floating-point formatting). A counter that is not hexadecimal
  -- is in the form written before Lp, "<used>@<period>" in decimal (a process not yet
  -- upgraded may still write one): it counts only in its own period.
  local sformat = string.format
  local refused, ct, cu, ck  -- the caps as hexadecimal strings (nil: not capped)
  local after_t, after_u, after_k  -- the counters' new values, hexadecimal (the hold's lf)
  -- One string for version and plan: the concatenation costs less than an argument more.
  if cached and st[8] and st[8] .. ' ' .. plan == ARGV[cached] then
    -- Cached: per level j (0 team, 1 user, 2 key) its cap ARGV[cached + 2 + j], counter
    -- field tn, un or kn and value st[counters_at + j]. Inline, not through level()
    -- below: a closure made per call costs more than the loop.
    local tm = ARGV[cached + 1]
    if tm ~= '' then team = tm end
    local nt = ntats
    for j = 0, 2 do
      local c = ARGV[cached + 2 + j]
      if c ~= '-' then
        local cap, raw, lused = tonumber(c, 16), st[counters_at + j], 0
        if raw then
          lused = tonumber(raw, 16)
          if not lused then
            local u, per = string.match(raw, '^(%d+)@(.*)$')
            lused = per == period and tonumber(u) or 0
          end
        end
        if lused + cost > cap then
          local name, id = 'team', team
          if j == 1 then name, id = 'user', user elseif j == 2 then name, id = 'key', key_id end
          refused = {'insufficient', math.max(0, cap - lused), plan, name, cap, lused,
            bal + extra, id}
          break
        end
        if cap - lused - cost < room then room = cap - lused - cost end
        local nv = sformat('%x', lused + cost)
        if j == 0 then
          ct, after_t, org_tats[nt + 1] = c, nv, tn
        elseif j == 1 then
          cu, after_u, org_tats[nt + 1] = c, nv, un
        else
          ck, after_k, org_tats[nt + 1] = c, nv, kn
        end
        org_tats[nt + 2] = nv
        nt = nt + 2
      end
    end
  else
    -- One capped level: its cap (tokens), what its counter (field counter, value raw)
    -- drew this period. Returns a refusal, or nil and the counter's new value (hexadecimal),
    -- which it adds to the org's HSET.
    local function level(name, id, cap, counter, raw)
      local lused = 0
      if raw then
        lused = tonumber(raw, 16)
        if not lused then
          local u, per = string.match(raw, '^(%d+)@(.*)$')
          lused = per == period and tonumber(u) or 0
        end
      end
      if lused + cost > cap then
        return {'insufficient', math.max(0, cap - lused), plan, name, cap, lused, bal + extra, id}
      end
      if cap - lused - cost < room then room = cap - lused - cost end
      local nv = sformat('%x', lused + cost)
      org_tats[#org_tats + 1] = counter  -- written with the org's state below
      org_tats[#org_tats + 1] = nv
      return nil, nv
    end
    local sbyte, ssub = string.byte, string.sub
    local version = st[8]
    local f_lp = 'Lp:' .. bucket
    local lp = redis_call('HGET', org_key, f_lp)
    if lp ~= period then
      -- The bucket's counters count another period (or are in the form written before
      -- Lp): the lazy reset of every level at once. Each counter of this period in the
      -- old form becomes a plain integer, every other one goes (nothing to count: its
      -- level starts the period at 0), once per bucket per period and org, in time
      -- proportional to the org's level fields (HSCAN's MATCH keeps them in C). Then a new
      -- version: every cached group of the org was resolved with counters of the old period.
      local match = 'Ln:' .. string.gsub(bucket, '[%*%?%[%]\\]', '\\%0') .. ':*'
      local cursor, set, del = '0', {}, {}
      repeat
        local page = redis_call('HSCAN', org_key, cursor, 'MATCH', match, 'COUNT', 1000)
        cursor = page[1]
        local kv = page[2]
        for j = 1, #kv, 2 do
          local u, per = string.match(kv[j + 1], '^(%d+)@(.*)$')
          if per == period and u ~= '0' then
            local n = #set
            set[n + 1], set[n + 2] = kv[j], string.format('%x', tonumber(u))
          else
            del[#del + 1] = kv[j]
          end
        end
      until cursor == '0'
      for j = 1, #del, 4000 do
        redis_call('HDEL', org_key, unpack(del, j, math.min(j + 3999, #del)))
      end
      for j = 1, #set, 4000 do
        redis_call('HSET', org_key, unpack(set, j, math.min(j + 3999, #set)))
      end
    end
    if lp ~= period or not version or sbyte(version, 1) ~= 118 then
      -- A new version after a reset, or for lv written before versions ("1" and dots:
      -- old lua/levels.lua), as lua/levels.lua makes them; 128 bytes of lvp keep the hash
      -- a hash table.
      local t = redis_call('TIME')
      version = 'v' .. t[1] .. '.' .. t[2] .. '.' .. redis_call('HINCRBY', org_key, 'lvn', 1)
      redis_call('HSET', org_key, f_lp, period, 'lv', version, 'lvp', string.rep('.', 128))
    end
    -- Per level (t team, u user, k key): cap override ?c, counter field ?n and value ?v.
    local p = ':' .. bucket .. ':'
    local tn, un, kn = 'Ln' .. p .. 't:' .. req_team, 'Ln' .. p .. 'u:' .. user,
      'Ln' .. p .. 'k:' .. key_id
    local r = redis_call('HMGET', org_key, 'Lm:k:' .. key_id, 'Lm:u:' .. user,
      'Lc' .. p .. 't:' .. req_team, tn, 'Lc' .. p .. 'u:' .. user, un,
      'Lc' .. p .. 'k:' .. key_id, kn)
    local tc, tv, uc, uv, kc, kv = r[3], r[4], r[5], r[6], r[7], r[8]
    -- The team: the API key's own, else the request's (JWT claim, scope), else the user's.
    team = r[1] or (req_team ~= '' and req_team) or r[2] or nil
    if team and team ~= req_team then
      tn = 'Ln' .. p .. 't:' .. team
      local t = redis_call('HMGET', org_key, 'Lc' .. p .. 't:' .. team, tn)
      tc, tv = t[1], t[2]
    end
    -- The plan's default caps of this bucket, as strings ("-1": none at that level).
    local d1, d2, d3 = '-1', '-1', '-1'
    if plan_caps ~= '' then
      d1, d2, d3 = string.match(plan_caps, '^(%-?%d+),(%-?%d+),(%-?%d+)$')
    end
    -- A level's cap in tokens and as a hexadecimal string: its override ov, else the
    -- default dflt (nil: the level has no cap).
    local function cap_of(ov, dflt)
      local cap = nil
      if ov then
        if sbyte(ov, 1) == 112 then  -- "p": a share of the allocation
          cap = math.floor(alloc * tonumber(ssub(ov, 2)) / 10000)
        else
          cap = tonumber(ov)
        end
      elseif dflt ~= '-1' then
        cap = tonumber(dflt)
      end
      if cap then return cap, sformat('%x', cap) end
      return nil, nil
    end
    -- Broadest first: the first refusal is the one reported.
    local cap
    if team then
      cap, ct = cap_of(tc, d1)
      if cap then refused, after_t = level('team', team, cap, tn, tv) end
    end
    if not refused and user ~= '' then
      cap, cu = cap_of(uc, d2)
      if cap then refused, after_u = level('user', user, cap, un, uv) end
    end
    if not refused and key_id ~= '' then
      cap, ck = cap_of(kc, d3)
      if cap then refused, after_k = level('key', key_id, cap, kn, kv) end
    end
    if not refused then
      learned = {version .. ' ' .. plan, team or '', ct or '-', cu or '-', ck or '-'}
    end
  end
  if refused then
    if ntats > 0 then
      redis_call('HSET', org_key, unpack(org_tats, 1, ntats))
    end
    return refused
  end
  if ct or cu or ck then
    -- The hold's caps of team, user and key ("-": not capped), then the key when it is
    -- capped; settle.lua names their counters from the hold's b, tm, u and that key.
    if ck then
      lv_hold = (ct or '-') .. ' ' .. (cu or '-') .. ' ' .. ck .. ' ' .. key_id
    else
      lv_hold = (ct or '-') .. ' ' .. (cu or '-') .. ' -'
    end
    lf_hold = (after_t or '-') .. ' ' .. (after_u or '-') .. ' ' .. (after_k or '-')
  end
elseif req_team ~= '' then
  team = req_team  -- no caps to check, but the audit row still names the team
end

-- Deduct: plan tokens first, then purchased lots in expiry order.
local from_plan = math.min(bal, cost)
local rest = cost - from_plan
local taken = {}
if rest > 0 then
  if lots == nil then lots = cjson_decode(lots_raw) end
  local kept = {}
  for _, lot in ipairs(lots) do
    local n = math.min(lot[3], rest)
    if n > 0 then
      rest = rest - n
      lot[3] = lot[3] - n
      taken[#taken + 1] = {lot[1], n, lot[2]}
    end
    if lot[3] > 0 then kept[#kept + 1] = lot end
  end
  lots = kept
end
local from_extra = cost - from_plan
bal = bal - from_plan
extra = extra - from_extra
used = used + cost
org_tats[#org_tats + 1] = f_bal
org_tats[#org_tats + 1] = bal
org_tats[#org_tats + 1] = f_used
org_tats[#org_tats + 1] = used
if from_extra > 0 then
  org_tats[#org_tats + 1] = f_extra
  org_tats[#org_tats + 1] = extra
  org_tats[#org_tats + 1] = f_lots
  org_tats[#org_tats + 1] = #lots > 0 and cjson_encode(lots) or '[]'
end
redis_call('HSET', org_key, unpack(org_tats))

local ik = ''
if idem_ttl > 0 then
  local state = fingerprint and ('F' .. fingerprint) or ''
  if reservation then
    -- Reserving completes the request: a repeat gets this reservation back.
    state = state .. 'V' .. request_id .. ' ' .. cost .. ' ' .. ARGV[7] .. ' ' .. (bal + extra)
  else
    ik = idem_key
    state = state .. 'h:' .. request_id
  end
  redis_call('SET', idem_key, state, 'PX', idem_ttl)
end
local hold = {
  o = org, u = user, f = feature, b = bucket, c = cost, pp = from_plan, lt = taken,
  per = period, rq = request_id, t0 = now, m = method, r = route, ik = ik, p = plan,
  s0 = seq_now}
if fingerprint and ik ~= '' then
  hold.fp = fingerprint
end
if team then hold.tm = team end
if lv_hold then hold.lx, hold.lf = lv_hold, lf_hold end
if reservation then
  hold.v, hold.rk, hold.e, hold.mx =
    tonumber(reservation), ARGV[i + 2], tonumber(ARGV[7]), tonumber(ARGV[i + 3])
end
redis_call('HSET', holds_key, request_id, cjson_encode(hold))
redis_call('ZADD', holdexp_key, ARGV[7], request_id)

if learned then
  -- The levels as resolved here, for the caller's template (see "Levels" above).
  return {'ok', room, limit, limit_remaining, limit_reset, unpack(learned)}
end
return {'ok', room, limit, limit_remaining, limit_reset}

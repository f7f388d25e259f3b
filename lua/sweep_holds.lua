-- sweep_holds.lua: turn holds left by a crashed or stuck gateway into charges, so tokens
-- never leak: the tokens stay taken and the request's one audit row says expired_hold
-- (outcome unknown). Run by the sync job, per shard.
--
-- KEYS[1]  shard holds hash    KEYS[2]  shard hold-expiry zset    KEYS[3]  shard events stream
-- ARGV[1]  now (ms)            ARGV[2]  at most this many holds
-- ARGV[3..] the features whose cost is decided after the call (usage or header costs,
--          contract A8; gateway.config Config.variable_features), none for a config
--          without them
--
-- Returns {swept, usage missing}: the number of holds swept, and how many of them were
-- expired with their usage missing (below). Each swept hold leaves exactly one event and its
-- tokens stay taken (t = the hold's c, all of it). An expired hold does not change the
-- org's balance (the tokens left it at admission), but its event still advances the org's
-- sequence number and carries the bucket's snapshot (bal, x, a, used, per, s), as a
-- settle's does: the last snapshot before it was taken while the hold was open, so without
-- a newer one the ledger (ai_tokens, creditgate reconcile) would keep the hold's tokens
-- as if they had never been spent, and a reconcile --repair would hand them back. The
-- org's state hash is <shard tag>:org:<org> (gateway/core/redis_keys.py): a key of the
-- same shard, hence of the same cluster slot as KEYS. Without org state (Redis lost it),
-- the event has no snapshot (s = "").
--
-- Usage missing: the hold of a feature named in ARGV[3..] was taken for a call whose
-- actual cost was to be read after it, and its gateway never settled it, so the usage
-- never came. Its event carries the usage fields as a settle whose usage never came does
-- (gateway/metering/usage_tap.py: cs = "policy", um = "1"), with rs = the reserve and
-- t = the reserve: what the row of a normal on_missing_usage settle shows, while its
-- kind, expired_hold, tells that the expiry (not the feature's policy) decided the charge.
-- The hold does not record its cost mode (charge.lua's hot path stays as it is), so the
-- caller names the features; a feature whose mode changed while its holds were open is
-- swept by the mode it has now.
--
-- A reservation's hold (DESIGN A9; hold fields v, rk: lua/charge.lua) expires the same
-- way; its event also carries the usage fields (rs = the reserve, cs = "reservation",
-- um = "1": the app never reported its actual), and its result, outcome "expired", is kept under its result key rk for v ms (a key of
-- the same shard, hence of the same cluster slot as KEYS), which is what a late settle
-- or release of it answers.
--
-- A hold that drew from team, user or key caps (hold field lx, lv before) keeps them
-- charged: their counters already include its tokens, exactly as the org's balance does;
-- the event names the request's team (tm) when it had one, and the levels' figures (lv,
-- for the cap alerts: level_figures in lua/_prelude.lua, the counters as the hold's charge
-- left them) when the hold has them and the bucket is still in the hold's period.
--
-- Audit events are written by audit_event, defined in lua/_prelude.lua (the loader
-- prepends it).

local holds_key, holdexp_key, stream_key = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', holdexp_key, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
-- "P:{sN}:holds" -> "P:{sN}:org:"
local org_prefix = string.sub(holds_key, 1, -6) .. 'org:'
local variable = nil  -- feature -> true, built only when some hold expired
local swept, missing = 0, 0
for _, request_id in ipairs(ids) do
  redis.call('ZREM', holdexp_key, request_id)
  local raw = redis.call('HGET', holds_key, request_id)
  if raw then
    redis.call('HDEL', holds_key, request_id)
    local h = cjson.decode(raw)
    local b, org_key = h.b, org_prefix .. h.o
    local snap = {'', '', '', '', h.per, ''}  -- bal, x, a, used, per, s
    if redis.call('EXISTS', org_key) == 1 then
      local st = redis.call('HMGET', org_key, 'b:' .. b, 'x:' .. b, 'a:' .. b, 'u:' .. b,
        'p:' .. b)
      snap = {st[1] or '0', st[2] or '0', st[3] or '0', st[4] or '0', st[5] or h.per,
        redis.call('HINCRBY', org_key, 'seq', 1)}
    end
    -- The capped levels' figures (nil: none), as the hold's charge left them.
    local lvf = nil
    if h.lx then lvf = level_figures(nil, h, snap[5]) end
    if variable == nil then
      variable = {}
      for i = 3, #ARGV do variable[ARGV[i]] = true end
    end
    if h.v or variable[h.f] then
      missing = missing + 1
      audit_event(stream_key,
        request_id, 'expired_hold', h.o, h.u, h.f, b, h.c,  -- id, k, o, u, f, b, t
        snap[1], snap[2], snap[3], snap[4], snap[5], snap[6], now,  -- bal .. ts
        request_id, '', now - h.t0, h.m, h.r, h.p, '',  -- rq, st, lat, m, r, p, ref
        h.c, '', '', '', '', '', '', h.v and 'reservation' or 'policy', '1',  -- rs .. um
        h.tm, lvf)  -- tm, lv
      if h.v then
        redis.call('SET', h.rk, cjson.encode({id = request_id, reserved = h.c, charged = h.c,
          refunded = 0, overage = 0, remaining = -1, outcome = 'expired'}), 'PX', h.v)
      end
    else
      audit_event(stream_key,
        request_id, 'expired_hold', h.o, h.u, h.f, b, h.c,  -- id, k, o, u, f, b, t
        snap[1], snap[2], snap[3], snap[4], snap[5], snap[6], now,  -- bal .. ts
        request_id, '', now - h.t0, h.m, h.r, h.p, '',  -- rq, st, lat, m, r, p, ref
        nil, nil, nil, nil, nil, nil, nil, nil, nil, h.tm, lvf)  -- no usage; tm, lv
    end
    swept = swept + 1
  end
end
return {swept, missing}

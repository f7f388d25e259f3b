-- sweep_holds.lua: turn holds left by a crashed or stuck gateway into charges, so tokens
-- never leak: the tokens stay taken and the request's one audit row says expired_hold
-- (outcome unknown). Run by the sync job, per shard.
--
-- KEYS[1]  shard holds hash    KEYS[2]  shard hold-expiry zset    KEYS[3]  shard events stream
-- ARGV[1]  now (ms)            ARGV[2]  at most this many holds
--
-- Returns the number of holds swept. The event carries no snapshot fields (s = ""):
-- an expired hold does not change the org's balance, it only writes the row. Each swept
-- hold leaves exactly one event and its tokens stay taken (t = the hold's c, all of it).
--
-- A reservation's hold (DESIGN A9; hold fields v, rk: lua/charge.lua) expires the same
-- way; its event also carries the usage fields (rs = the reserve, cs = "reservation"),
-- and its result, outcome "expired", is kept under its result key rk for v ms (a key of
-- the same shard, hence of the same cluster slot as KEYS), which is what a late settle
-- or release of it answers.
--
-- A hold that drew from team, user or key caps (hold field lv) keeps them charged: their
-- counters already include its tokens, exactly as the org's balance does; the event names
-- the request's team (tm) when it had one.
--
-- Audit events are written by audit_event, defined in lua/_prelude.lua (the loader
-- prepends it).

local holds_key, holdexp_key, stream_key = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', holdexp_key, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local swept = 0
for _, request_id in ipairs(ids) do
  redis.call('ZREM', holdexp_key, request_id)
  local raw = redis.call('HGET', holds_key, request_id)
  if raw then
    redis.call('HDEL', holds_key, request_id)
    local h = cjson.decode(raw)
    if h.v then
      audit_event(stream_key,
        request_id, 'expired_hold', h.o, h.u, h.f, h.b, h.c,  -- id, k, o, u, f, b, t
        '', '', '', '', h.per, '', now,  -- bal, x, a, used, per, s, ts
        request_id, '', now - h.t0, h.m, h.r, h.p, '',  -- rq, st, lat, m, r, p, ref
        h.c, '', '', '', '', '', '', 'reservation', '', h.tm)  -- rs, ov, mdl .. ur, cs, um, tm
      redis.call('SET', h.rk, cjson.encode({id = request_id, reserved = h.c, charged = h.c,
        refunded = 0, overage = 0, remaining = -1, outcome = 'expired'}), 'PX', h.v)
    else
      audit_event(stream_key,
        request_id, 'expired_hold', h.o, h.u, h.f, h.b, h.c,  -- id, k, o, u, f, b, t
        '', '', '', '', h.per, '', now,  -- bal, x, a, used, per, s, ts
        request_id, '', now - h.t0, h.m, h.r, h.p, '',  -- rq, st, lat, m, r, p, ref
        nil, nil, nil, nil, nil, nil, nil, nil, nil, h.tm)  -- no usage fields; tm
    end
    swept = swept + 1
  end
end
return swept

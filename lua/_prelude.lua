-- _prelude.lua: the audit event, written once for every script that records one.
--
-- Not a script of its own: the loader (gateway/redisio/lua_scripts.py) puts the code below
-- in front of each script that calls audit_event, joined into one line that precedes the
-- script's own first line, so line numbers in Redis error messages still match the
-- script's file. Hence comments here stand on lines of their own, never after code.
--
-- audit_event(stream_key, <the 21 fields>) appends one event to the shard's stream. The
-- parameters are the fields of gateway/core/events.py, in that order, and so is the
-- entry (the sync job decodes it: sync/records.py); pass '' for a field without a value.
-- Positional, not a table of fields: settle.lua writes one event per request, and
-- building a table for each costs Redis ~0.7 µs more per event (~25 % of the XADD).
--
-- audit_event(stream_key, <the 21 fields>, <the 9 usage fields>) appends the same entry
-- followed by the usage fields (events.USAGE_FIELDS: rs ov mdl ui uc uo ur cs um), for a
-- request whose charge was decided after the call (an actual cost, a reservation). Every
-- other event keeps the 21 fields only: one function and one branch, so the fixed-cost
-- path does no other work than before.
--
-- A request's team (contract A10) is the 31st parameter, tm, after the usage fields (pass
-- nil for those when it has none): the entry then ends with 'tm', <team>. A nil tm writes
-- nothing more, so events without a team are the same entries as before.
--
-- A request event whose hold had capped levels passes their figures after the event as the
-- 32nd parameter, lv (level_figures below): the entry then ends with 'tm', <team or ''>,
-- 'lv', <figures>. The sync job reads them for the cap alerts (contract A11) and strips
-- them before anything else sees the entry (sync/levels.py); the ledger row is unchanged.

-- The entry is v2 (gateway/core/events.py): one field, 'v2', the values in the order above
-- joined by tabs; the count of values says which fields are there (21, + the 9 usage
-- fields, + tm, + tm and lv). Two fields instead of 42 or more: XADD converts, parses and
-- stores 2 strings, and the sync job's client builds 2 Python strings instead of 42. The
-- tab is the separator, so an event with a tab in any value (ids, refs, models, teams come
-- from clients and configs) is written as before, as v1 field/value pairs: a plain find
-- over the text values joined without separators (one memchr) says so: ids, names,
-- period, route, refs, model, cost source, team, figures. The counts, balances, times and
-- statuses are integers the scripts and the gateway compute (a number is not even turned
-- into text twice). An event with a number that .. renders in exponent form ('e+':
-- integers of 15 digits and more, which XADD itself writes in full) is v1 too: the values
-- stay those v1 would write.
-- Upgrading: sync workers before gateways (README "Upgrading"): an older worker cannot
-- read v2 and dead-letters it.

local function audit_event(stream_key,
    id, k, o, u, f, b, t, bal, x, a, used, per, s, ts, rq, st, lat, m, r, p, ref,
    rs, ov, mdl, ui, uc, uo, ur, cs, um, tm, lv)
  local v = id .. '\t' .. k .. '\t' .. o .. '\t' .. u .. '\t' .. f .. '\t' .. b .. '\t' .. t
    .. '\t' .. bal .. '\t' .. x .. '\t' .. a .. '\t' .. used .. '\t' .. per .. '\t' .. s .. '\t' .. ts
    .. '\t' .. rq .. '\t' .. st .. '\t' .. lat .. '\t' .. m .. '\t' .. r .. '\t' .. p .. '\t' .. ref
  local all = id .. o .. u .. f .. b .. per .. rq .. m .. r .. p .. ref
  if rs ~= nil then
    v = v .. '\t' .. rs .. '\t' .. ov .. '\t' .. mdl .. '\t' .. ui .. '\t' .. uc .. '\t' .. uo
      .. '\t' .. ur .. '\t' .. cs .. '\t' .. um
    all = all .. mdl .. cs
  end
  if lv ~= nil then
    v = v .. '\t' .. (tm or '') .. '\t' .. lv
    all = all .. (tm or '') .. lv
  elseif tm ~= nil then
    v = v .. '\t' .. tm
    all = all .. tm
  end
  if not string.find(all, '\t', 1, true) and not string.find(v, 'e+', 1, true) then
    return redis.call('XADD', stream_key, '*', 'v2', v)
  end
  if lv ~= nil then
    if rs == nil then
      return redis.call('XADD', stream_key, '*',
        'id', id, 'k', k, 'o', o, 'u', u, 'f', f, 'b', b, 't', t,
        'bal', bal, 'x', x, 'a', a, 'used', used, 'per', per, 's', s, 'ts', ts,
        'rq', rq, 'st', st, 'lat', lat, 'm', m, 'r', r, 'p', p, 'ref', ref, 'tm', tm or '',
        'lv', lv)
    end
    return redis.call('XADD', stream_key, '*',
      'id', id, 'k', k, 'o', o, 'u', u, 'f', f, 'b', b, 't', t,
      'bal', bal, 'x', x, 'a', a, 'used', used, 'per', per, 's', s, 'ts', ts,
      'rq', rq, 'st', st, 'lat', lat, 'm', m, 'r', r, 'p', p, 'ref', ref,
      'rs', rs, 'ov', ov, 'mdl', mdl, 'ui', ui, 'uc', uc, 'uo', uo, 'ur', ur, 'cs', cs, 'um', um,
      'tm', tm or '', 'lv', lv)
  end
  if rs == nil then
    if tm == nil then
      return redis.call('XADD', stream_key, '*',
        'id', id, 'k', k, 'o', o, 'u', u, 'f', f, 'b', b, 't', t,
        'bal', bal, 'x', x, 'a', a, 'used', used, 'per', per, 's', s, 'ts', ts,
        'rq', rq, 'st', st, 'lat', lat, 'm', m, 'r', r, 'p', p, 'ref', ref)
    end
    return redis.call('XADD', stream_key, '*',
      'id', id, 'k', k, 'o', o, 'u', u, 'f', f, 'b', b, 't', t,
      'bal', bal, 'x', x, 'a', a, 'used', used, 'per', per, 's', s, 'ts', ts,
      'rq', rq, 'st', st, 'lat', lat, 'm', m, 'r', r, 'p', p, 'ref', ref, 'tm', tm)
  end
  if tm == nil then
    return redis.call('XADD', stream_key, '*',
      'id', id, 'k', k, 'o', o, 'u', u, 'f', f, 'b', b, 't', t,
      'bal', bal, 'x', x, 'a', a, 'used', used, 'per', per, 's', s, 'ts', ts,
      'rq', rq, 'st', st, 'lat', lat, 'm', m, 'r', r, 'p', p, 'ref', ref,
      'rs', rs, 'ov', ov, 'mdl', mdl, 'ui', ui, 'uc', uc, 'uo', uo, 'ur', ur, 'cs', cs, 'um', um)
  end
  return redis.call('XADD', stream_key, '*',
    'id', id, 'k', k, 'o', o, 'u', u, 'f', f, 'b', b, 't', t,
    'bal', bal, 'x', x, 'a', a, 'used', used, 'per', per, 's', s, 'ts', ts,
    'rq', rq, 'st', st, 'lat', lat, 'm', m, 'r', r, 'p', p, 'ref', ref,
    'rs', rs, 'ov', ov, 'mdl', mdl, 'ui', ui, 'uc', uc, 'uo', uo, 'ur', ur, 'cs', cs, 'um', um,
    'tm', tm)
end

-- level_figures(org_key, h, per): the figures of hold h's capped levels after its event in
-- period per (the event's), for the sync job's cap alerts (sync/levels.py):
-- "<team counter> <user counter> <key counter> " followed by the hold's lx, "<team cap>
-- <user cap> <key cap>[ <key id>]" (lua/charge.lua), all hexadecimal, '-' for a level
-- without a cap. nil for a hold without levels or from before lf, and when the event's
-- period is not the hold's (its counters were reset since; the caps were the old period's).
-- org_key nil: the counters as the hold's charge left them (its lf), for an event that did
-- not move them (a charge of the hold, an expiry): the common settle reads nothing more
-- and concatenates two strings. An event that moved them (a refund, an actual other
-- than the hold) passes org_key and they are read again, after the move: one HMGET, with
-- the bucket's Lp (a counter of another period than per is not this period's: nil).
-- Measured (bench/lua_instructions.py, BENCHMARKS.md section 10): reading the counters in
-- every settle cost a capped settle ~+19k instructions (+22%); lf costs it ~+6k (its
-- decoding, the concatenation, two more XADD values) and the charge ~+1k.
local function level_figures(org_key, h, per)
  local lx = h.lx
  if lx == nil or per ~= h.per then
    return nil
  end
  if org_key == nil then
    local lf = h.lf
    if lf == nil then
      return nil
    end
    return lf .. ' ' .. lx
  end
  local p = 'Ln:' .. h.b .. ':'
  local got = redis.call('HMGET', org_key, 'Lp:' .. h.b, p .. 't:' .. (h.tm or ''),
    p .. 'u:' .. h.u, p .. 'k:' .. (string.match(lx, '^%S+ %S+ %S+ (.+)$') or ''))
  if got[1] ~= per then
    return nil
  end
  return (got[2] or '0') .. ' ' .. (got[3] or '0') .. ' ' .. (got[4] or '0') .. ' ' .. lx
end

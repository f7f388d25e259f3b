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

local function audit_event(stream_key,
    id, k, o, u, f, b, t, bal, x, a, used, per, s, ts, rq, st, lat, m, r, p, ref,
    rs, ov, mdl, ui, uc, uo, ur, cs, um, tm, lv)
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

-- level_figures(org_key, h): the figures of hold h's capped levels after its event, for
-- the sync job's cap alerts: "<team cap> <user cap> <key cap> <team counter> <user
-- counter> <key counter> <key id>". The caps are the hold's lv (lua/charge.lua: '-' for a
-- level without a cap); each counter is its raw "<used>@<period>" field (the one
-- charge.lua checks; '0' when absent), read after the event moved it, with the period
-- left for the sync job to compare (a counter of another period reads 0, the lazy
-- reset); the key id is '-' when the key is not capped. nil for a hold without levels or
-- written before lv had that form. One HMGET and one concatenation: measured
-- (bench/lua_instructions.py), splitting and rebuilding the figures here cost Redis
-- more than the HMGET itself.
local function level_figures(org_key, h)
  local lv = h.lv
  if type(lv) ~= 'string' then
    return nil
  end
  local p = 'Ln:' .. h.b .. ':'
  local got = redis.call('HMGET', org_key, p .. 't:' .. (h.tm or ''), p .. 'u:' .. (h.u or ''),
    p .. 'k:' .. (h.k or ''))
  return lv .. ' ' .. (got[1] or '0') .. ' ' .. (got[2] or '0') .. ' ' .. (got[3] or '0') ..
    ' ' .. (h.k or '-')
end

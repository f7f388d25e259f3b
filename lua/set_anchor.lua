-- set_anchor.lua: set an org's period anchor (contract A12) in its state hash, only when
-- the org has state: a hash holding only the anchor would look seeded to seed.lua (whose
-- set-if-absent would then skip the org's plan and balances). Without state, the anchor
-- is seeded from the ledger with the rest.
--
-- KEYS[1]  org state hash
-- ARGV[1]  the anchor ("<day>:<since date>", gateway/core/anchors.py)
--
-- Returns 1 when set, 0 when the org has no state here.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'pa', ARGV[1])
return 1

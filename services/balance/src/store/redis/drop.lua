-- Drops a member's hot state so the next access rebuilds it from the ledger. With a
-- stamp, only if the state is still the one with that stamp.
-- KEYS[1]: state; KEYS[2]: records; KEYS[3]: their write times. ARGV[1]: stamp, or '' for
-- unconditionally.
local raw = redis.call('GET', KEYS[1])
if not raw then
  return 0
end
if ARGV[1] ~= '' and cmsgpack.unpack(raw).stamp ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1

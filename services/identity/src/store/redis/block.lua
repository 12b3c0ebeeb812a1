-- Writes a member blocked or unblocked with its profile and block record, if it is stored
-- active or blocked at the expected profile version.
-- KEYS: members, profiles, meta, blocks
-- ARGV: member id, expected version, member record, profile record, meta, block record
--       ('' removes it)
local id = ARGV[1]
local before = meta_of(KEYS[3], id)
if not before or (before.status ~= 'A' and before.status ~= 'B') or before.version ~= ARGV[2] then
  return 'no'
end
redis.call('HSET', KEYS[1], id, ARGV[3])
redis.call('HSET', KEYS[2], id, ARGV[4])
redis.call('HSET', KEYS[3], id, ARGV[5])
if ARGV[6] == '' then
  redis.call('HDEL', KEYS[4], id)
else
  redis.call('HSET', KEYS[4], id, ARGV[6])
end
return 'yes'

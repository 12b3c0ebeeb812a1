-- Writes a member and its profile if the stored profile version is the expected one,
-- moving the email entry when the email changed.
-- KEYS: members, profiles, meta, emails
-- ARGV: member id, expected version, member record, profile record, meta, new email
local id, email = ARGV[1], ARGV[6]
local before = meta_of(KEYS[3], id)
if not before or before.version ~= ARGV[2] then return 'stale' end
if before.email ~= email then
  if not free_for(KEYS[4], email, id) then return 'email' end
  unindex(KEYS[4], before.email, id)
  if email ~= '' then redis.call('HSET', KEYS[4], email, id) end
end
redis.call('HSET', KEYS[1], id, ARGV[3])
redis.call('HSET', KEYS[2], id, ARGV[4])
redis.call('HSET', KEYS[3], id, ARGV[5])
return 'done'

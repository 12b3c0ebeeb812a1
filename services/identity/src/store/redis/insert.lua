-- Inserts a member with its phone, email and referral-code entries, or nothing.
-- KEYS: phones, emails, codes, members, meta, member ids
-- ARGV: member id, phone, email, code, member record, meta (profile version 0), status code
local id, phone, email, code = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('HEXISTS', KEYS[1], phone) == 1 then return 'phone' end
if not free_for(KEYS[2], email, id) then return 'email' end
if redis.call('HEXISTS', KEYS[3], code) == 1 then return 'code' end
if email ~= '' then redis.call('HSET', KEYS[2], email, id) end
redis.call('HSET', KEYS[4], id, ARGV[5])
-- A member written again keeps the version of the profile stored beside it.
local before = meta_of(KEYS[5], id)
if before then
  redis.call('HSET', KEYS[5], id, table.concat({ARGV[7], before.version, phone, email, code}, SEP))
else
  redis.call('HSET', KEYS[5], id, ARGV[6])
end
redis.call('ZADD', KEYS[6], 0, id)
redis.call('HSET', KEYS[1], phone, id)
redis.call('HSET', KEYS[3], code, id)
return 'done'

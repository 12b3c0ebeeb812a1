-- Changes one member in one atomic step: applies new events' features and sets membership
-- flags, if the member is still at the version the caller read.
--
-- KEYS: the tenant's 1 member versions, 2 features, 3 ids of members with features,
--       4 applied event ids, 5 the same by time, 6 segment versions; 7 the member's
--       segments, 8 its membership history; then one per flag: that segment's members.
--       One hash tag.
-- ARGV[1]: member; ARGV[2]: its version as read ('' : none); ARGV[3]: its new features,
-- encoded ('' : unchanged); ARGV[4]: now (ms); ARGV[5]: now, zero-padded; ARGV[6]: n event
-- ids, then the ids; then the number of flags, then segment, 1 or 0, and the segment's
-- version ("version:update_time") the flag was decided on, for each ('*': any version, as
-- long as the segment exists and is not being deleted: static lists).
--
-- Returns {'conflict'} (nothing written: read again) or {'ok', memberships changed}. A flag
-- whose segment moved to another version, or was deleted, is skipped.
local member = ARGV[1]
if (redis.call('HGET', KEYS[1], member) or '') ~= ARGV[2] then return {'conflict'} end
local n_ids = tonumber(ARGV[6])
for i = 1, n_ids do
  if redis.call('HEXISTS', KEYS[4], ARGV[6 + i]) == 1 then return {'conflict'} end
end
local touched = false
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[2], member, ARGV[3])
  redis.call('ZADD', KEYS[3], 0, member)
  touched = true
end
for i = 1, n_ids do
  redis.call('HSET', KEYS[4], ARGV[6 + i], ARGV[4])
  redis.call('ZADD', KEYS[5], tonumber(ARGV[4]), ARGV[6 + i])
end
local base = 7 + n_ids
local n_flags = tonumber(ARGV[base])
local changed = 0
for i = 0, n_flags - 1 do
  local segment = ARGV[base + 1 + 3 * i]
  local entered = ARGV[base + 2 + 3 * i] == '1'
  local version = redis.call('HGET', KEYS[6], segment)
  local wanted = ARGV[base + 3 + 3 * i]
  if version and (version == wanted or (wanted == '*' and version ~= 'deleting')) then
    local is = redis.call('SISMEMBER', KEYS[7], segment) == 1
    if entered ~= is then
      if entered then
        redis.call('SADD', KEYS[7], segment)
        redis.call('ZADD', KEYS[9 + i], 0, member)
      else
        redis.call('SREM', KEYS[7], segment)
        redis.call('ZREM', KEYS[9 + i], member)
      end
      local entry = ARGV[5] .. '\0' .. segment .. '\0'
      redis.call('ZREM', KEYS[8], entry .. (entered and '0' or '1'))
      redis.call('ZADD', KEYS[8], 0, entry .. (entered and '1' or '0'))
      redis.call('ZREMRANGEBYRANK', KEYS[8], 0, -1001)
      changed = changed + 1
    end
  end
end
if touched or n_ids > 0 or changed > 0 then redis.call('HINCRBY', KEYS[1], member, 1) end
return {'ok', changed}

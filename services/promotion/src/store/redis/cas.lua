-- Saves a versioned record (a program or a campaign) if its version is still the one read.
--
-- KEYS[1]: the hash of versions; KEYS[2]: the hash of records; for a campaign also
--          KEYS[3]: its history, KEYS[4]: the tenant's campaigns version. One hash tag.
-- ARGV[1]: field; ARGV[2]: the version read ('' : none existed); ARGV[3]: the new
-- version; ARGV[4]: the record, encoded.
--
-- Returns 1 when saved, 0 when the version moved meanwhile (nothing written).
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (current or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
if #KEYS > 2 then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[4])
  -- The campaigns version moves to the server's time in microseconds (or one up, if that
  -- is not ahead): a version lost in a failover is never handed out again for another set.
  local t = redis.call('TIME')
  local bumped = tonumber(redis.call('GET', KEYS[4]) or '0') + 1
  local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if clock > bumped then bumped = clock end
  redis.call('SET', KEYS[4], string.format('%d', bumped))
end
return 1

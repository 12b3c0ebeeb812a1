-- Writes API keys; with an expected live key, only while that key is unrevoked.
-- KEYS: keys, live key ids, key ids by tenant
-- ARGV: expected live key id ('' for none), n, n x (key id, record, tenant entry,
--       revoked '1' or '0')
if ARGV[1] ~= '' and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 0 end
for j = 0, tonumber(ARGV[2]) - 1 do
  local at = 3 + j * 4
  redis.call('HSET', KEYS[1], ARGV[at], ARGV[at + 1])
  redis.call('ZADD', KEYS[3], 0, ARGV[at + 2])
  if ARGV[at + 3] == '1' then
    redis.call('SREM', KEYS[2], ARGV[at])
  else
    redis.call('SADD', KEYS[2], ARGV[at])
  end
end
return 1

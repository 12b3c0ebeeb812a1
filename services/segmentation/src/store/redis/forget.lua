-- Forgets applied event ids older than the deduplication window, a bounded number per call.
--
-- KEYS[1]: the tenant's applied ids; KEYS[2]: the same by time. ARGV[1]: the horizon (ms).
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, 1000)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return #old

-- Loads a member's state and records rebuilt from the durable ledger, unless the state is
-- already there (hot state is replaced only by an explicit drop, never overwritten).
-- KEYS[1]: state; KEYS[2]: records. ARGV[1]: state; ARGV[2k], ARGV[2k+1]: key, record.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('DEL', KEYS[2])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('SET', KEYS[1], ARGV[1])
return 1

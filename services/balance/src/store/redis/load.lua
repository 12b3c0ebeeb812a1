-- Loads a member's state rebuilt from the durable ledger, unless the state is already there
-- (hot state is replaced only by an explicit drop, never overwritten). Records are not
-- loaded: they come back one at a time when an operation needs them (restore.lua).
-- KEYS[1]: state; KEYS[2]: records; KEYS[3]: their write times.
-- ARGV[1]: state; ARGV[2]: how long a state without any change is kept (ms; 0: for ever),
-- so members only ever read do not stay in memory.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3])
local ttl = tonumber(ARGV[2])
if ttl > 0 and cmsgpack.unpack(ARGV[1]).version == 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1

-- Puts one record back from the durable ledger (after it was dropped from the hot state
-- for its age), only while the hot state is the ledger's: its version is the one the
-- ledger had before the record was read, so no change to the record is still on its way
-- there. A record already in Redis is never replaced.
-- KEYS[1]: state; KEYS[2]: records; KEYS[3]: their write times.
-- ARGV[1]: now (ms); ARGV[2]: retention (ms; 0: for ever); ARGV[3]: key; ARGV[4]: record;
-- ARGV[5]: the ledger's version.
-- Returns 1 when put back, 0 when the state is not loaded or the record is there, -1 when
-- the state's version is another.
local raw = redis.call('GET', KEYS[1])
if not raw then
  return 0
end
if cmsgpack.unpack(raw).version ~= tonumber(ARGV[5]) then
  return -1
end
if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[4]) == 0 then
  return 0
end
local retention = tonumber(ARGV[2])
if retention > 0 then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[1]), ARGV[3])
  redis.call('PEXPIRE', KEYS[2], retention)
  redis.call('PEXPIRE', KEYS[3], retention)
end
return 1

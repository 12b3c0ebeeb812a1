-- Makes an RFM run current unless a later one already is.
--
-- KEYS[1]: the tenant's current run; KEYS[2]: its generation. One hash tag.
-- ARGV[1]: the run's generation; ARGV[2]: the run, encoded. Returns 1 when published.
local current = redis.call('GET', KEYS[2])
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
return 1

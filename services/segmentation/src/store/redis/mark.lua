-- Marks a segment as being deleted: no rule matches it any more.
--
-- KEYS[1]: the tenant's segments; KEYS[2]: their versions. ARGV[1]: segment id; ARGV[2]:
-- the version marking it. Returns 0 when there is no such segment.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1

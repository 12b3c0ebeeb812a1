-- Removes a deleted segment's definition once its members left, if it is still the one
-- being deleted (another process may have finished the deletion and the segment been
-- created again since).
--
-- KEYS[1]: the tenant's segments; KEYS[2]: their versions. ARGV[1]: segment id; ARGV[2]:
-- the version marking a deletion. Returns 1 when removed.
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1

-- Takes members out of a segment being deleted (a chunk at a time).
--
-- KEYS[1]: the segment's members; KEYS[2]: the tenant's member versions; KEYS[3]: the
--          segments' versions; then for each member its segments and its membership
--          history. One hash tag.
-- ARGV[1]: segment id; ARGV[2]: now, zero-padded; ARGV[3]: the version marking a deletion;
--          then the members.
--
-- Returns how many left, or -1 when the segment is no longer being deleted (another
-- process finished the deletion, and the segment may have been created again since).
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[3] then return -1 end
local left = 0
for i = 4, #ARGV do
  local member = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], member) then
    local segments = KEYS[4 + 2 * (i - 4)]
    local history = KEYS[5 + 2 * (i - 4)]
    redis.call('ZREM', KEYS[1], member)
    redis.call('SREM', segments, ARGV[1])
    local entry = ARGV[2] .. '\0' .. ARGV[1] .. '\0'
    redis.call('ZREM', history, entry .. '1')
    redis.call('ZADD', history, 0, entry .. '0')
    redis.call('ZREMRANGEBYRANK', history, 0, -1001)
    redis.call('HINCRBY', KEYS[2], member, 1)
    left = left + 1
  end
end
return left

-- Creates or replaces a segment definition (compare and set on its version).
--
-- KEYS[1]: the tenant's segments; KEYS[2]: their versions ("version:update_time"). One tag.
-- ARGV[1]: segment id; ARGV[2]: the version it must be at ('' : must not exist); ARGV[3]:
-- most segments a tenant may have; ARGV[4]: the definition, encoded; ARGV[5]: its
-- "version:update_time".
--
-- Returns 1 when saved, 0 when the check failed.
local id = ARGV[1]
if ARGV[2] == '' then
  if redis.call('HEXISTS', KEYS[1], id) == 1 then return 0 end
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
else
  local current = redis.call('HGET', KEYS[2], id)
  if not current then return 0 end
  if string.match(current, '^(%-?%d+):') ~= ARGV[2] then return 0 end
end
redis.call('HSET', KEYS[1], id, ARGV[4])
redis.call('HSET', KEYS[2], id, ARGV[5])
return 1

-- Saves a stacking group and moves the tenant's campaigns version on (as cas.lua does).
--
-- KEYS[1]: the tenant's groups; KEYS[2]: its campaigns version. One hash tag.
-- ARGV[1]: group id; ARGV[2]: the group, encoded.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local t = redis.call('TIME')
local bumped = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
if clock > bumped then bumped = clock end
redis.call('SET', KEYS[2], string.format('%d', bumped))
return 1

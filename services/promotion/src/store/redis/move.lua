-- Files one member's purchase history under another (a merge).
--
-- KEYS[1]: the tenant's merge table (routes the script; every key below shares its tag).
-- ARGV[1]: the tenant's key prefix.
-- ARGV[2]: the member merged away.
-- ARGV[3]: the member it was merged into.
--
-- Returns how many purchases moved. The history goes to the end of the survivor's own
-- chain of merges, and later purchases of the merged member follow it there.
local p = ARGV[1]
local from = ARGV[2]
local to = ARGV[3]
for _ = 1, 16 do
  local into = redis.call('HGET', KEYS[1], to)
  if not into then break end
  to = into
end
if to == from then return 0 end
redis.call('HSET', KEYS[1], from, to)
local source = p .. ':mh:' .. from
local positions = redis.call('ZRANGE', source, 0, -1)
local target = p .. ':mh:' .. to
for i = 1, #positions, 500 do
  local args = {}
  for j = i, math.min(i + 499, #positions) do
    args[#args + 1] = 0
    args[#args + 1] = positions[j]
  end
  redis.call('ZADD', target, unpack(args))
end
redis.call('DEL', source)
return #positions

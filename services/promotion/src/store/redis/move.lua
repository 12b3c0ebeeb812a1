-- Files one member's purchase history under another (a merge).
--
-- KEYS[1]: the tenant's merges; KEYS[2]: the history of the member merged away; KEYS[3]:
--          the history of the member it goes to. One hash tag.
-- ARGV[1]: the member merged away.
-- ARGV[2]: the member it was merged into.
-- ARGV[3]: the member whose history KEYS[3] is: the end of ARGV[2]'s merges, as the caller
--          believes.
--
-- Returns {'done', how many purchases moved} or {'moved', the end of ARGV[2]'s merges}
-- (call again with it; nothing written). Later purchases of the merged member follow it.
local from = ARGV[1]
local to = ARGV[2]
for _ = 1, 16 do
  local into = redis.call('HGET', KEYS[1], to)
  if not into then break end
  to = into
end
if to ~= ARGV[3] then return {'moved', to} end
if to == from then return {'done', 0} end
redis.call('HSET', KEYS[1], from, to)
local positions = redis.call('ZRANGE', KEYS[2], 0, -1)
for i = 1, #positions, 500 do
  local args = {}
  for j = i, math.min(i + 499, #positions) do
    args[#args + 1] = 0
    args[#args + 1] = positions[j]
  end
  redis.call('ZADD', KEYS[3], unpack(args))
end
redis.call('DEL', KEYS[2])
return {'done', #positions}

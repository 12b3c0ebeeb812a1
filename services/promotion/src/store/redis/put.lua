-- Writes a purchase and applies claims in one atomic step, or applies claims alone.
--
-- KEYS[1]: the tenant's purchase versions (routes the script to the tenant's slot; every
--          key below shares its hash tag).
-- ARGV[1]: the tenant's key prefix.
-- ARGV[2]: receipt id ('' : claims only, no purchase).
-- ARGV[3]: expected stored version ('' : none may exist).
-- ARGV[4]: the purchase's version.
-- ARGV[5]: the purchase, encoded.
-- ARGV[6]: where it is filed as unsettled ('' : settled).
-- ARGV[7]: member whose history it joins ('' : none).
-- ARGV[8]: its position in that history.
-- ARGV[9]: number of claims, then counter, amount, limit for each.
--
-- Returns {'written'}, {'conflict'} or {'refused', index of the first claim that does not
-- fit (0-based)}. Nothing is written unless the answer is 'written'.
local p = ARGV[1]
local receipt = ARGV[2]

if receipt ~= '' then
  local current = redis.call('HGET', p .. ':purv', receipt)
  if ARGV[3] == '' then
    if current then return {'conflict'} end
  elseif current ~= ARGV[3] then
    return {'conflict'}
  end
end

-- Every claim is checked before any is applied; a counter claimed twice sees the first.
local counters = p .. ':ctr'
local n = tonumber(ARGV[9])
local next_value = {}
local order = {}
for i = 0, n - 1 do
  local counter = ARGV[10 + 3 * i]
  local amount = tonumber(ARGV[11 + 3 * i])
  local limit = tonumber(ARGV[12 + 3 * i])
  local current = next_value[counter]
  if current == nil then
    current = tonumber(redis.call('HGET', counters, counter) or '0')
    order[#order + 1] = counter
  end
  if amount > 0 and limit > 0 and current + amount > limit then
    return {'refused', i}
  end
  local value = current + amount
  if value < 0 then value = 0 end
  next_value[counter] = value
end
for _, counter in ipairs(order) do
  local value = next_value[counter]
  if value == 0 then
    redis.call('HDEL', counters, counter)
  else
    redis.call('HSET', counters, counter, string.format('%d', value))
  end
end

if receipt == '' then return {'written'} end

redis.call('HSET', p .. ':pur', receipt, ARGV[5])
redis.call('HSET', p .. ':purv', receipt, ARGV[4])
redis.call('ZADD', p .. ':pids', 0, receipt)

-- Filed under the time it became unsettled; moved or removed as that changes.
local was = redis.call('HGET', p .. ':unsr', receipt)
local now = ARGV[6]
if (was or '') ~= now then
  if was then redis.call('ZREM', p .. ':uns', was) end
  if now ~= '' then
    redis.call('ZADD', p .. ':uns', 0, now)
    redis.call('HSET', p .. ':unsr', receipt, now)
  else
    redis.call('HDEL', p .. ':unsr', receipt)
  end
end

-- Filed where the member's history is now: a receipt resolved just before a merge is
-- committed after it.
local member = ARGV[7]
if member ~= '' then
  for _ = 1, 16 do
    local into = redis.call('HGET', p .. ':merged', member)
    if not into then break end
    member = into
  end
  redis.call('ZADD', p .. ':mh:' .. member, 0, ARGV[8])
end
return {'written'}

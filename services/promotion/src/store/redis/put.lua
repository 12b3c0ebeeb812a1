-- Writes a purchase and applies claims in one atomic step, or applies claims alone.
--
-- KEYS: the tenant's 1 purchase versions, 2 counters, 3 purchase records, 4 receipt ids,
--       5 unsettled list, 6 each receipt's unsettled entry, 7 merges, 8 the history of the
--       member the purchase is filed under (any tenant key when none). One hash tag.
-- ARGV[1]: receipt id ('' : claims only, no purchase).
-- ARGV[2]: expected stored version ('' : none may exist).
-- ARGV[3]: the purchase's version.
-- ARGV[4]: the purchase, encoded.
-- ARGV[5]: where it is filed as unsettled ('' : settled).
-- ARGV[6]: the purchase's member ('' : none joins a history).
-- ARGV[7]: the member whose history KEYS[8] is: the end of ARGV[6]'s merges, as the caller
--          believes.
-- ARGV[8]: the purchase's position in that history.
-- ARGV[9]: number of claims, then counter, amount, limit for each.
--
-- Returns {'written'}, {'conflict'}, {'refused', index of the first claim that does not fit
-- (0-based)} or {'moved', the member the history really is under} (call again with it).
-- Nothing is written unless the answer is 'written'.
local receipt = ARGV[1]

if receipt ~= '' then
  local current = redis.call('HGET', KEYS[1], receipt)
  if ARGV[2] == '' then
    if current then return {'conflict'} end
  elseif current ~= ARGV[2] then
    return {'conflict'}
  end
  -- Filed where the member's history is now: a receipt resolved just before a merge is
  -- committed after it.
  if ARGV[6] ~= '' then
    local member = ARGV[6]
    for _ = 1, 16 do
      local into = redis.call('HGET', KEYS[7], member)
      if not into then break end
      member = into
    end
    if member ~= ARGV[7] then return {'moved', member} end
  end
end

-- Every claim is checked before any is applied; a counter claimed twice sees the first.
local n = tonumber(ARGV[9])
local next_value = {}
local order = {}
for i = 0, n - 1 do
  local counter = ARGV[10 + 3 * i]
  local amount = tonumber(ARGV[11 + 3 * i])
  local limit = tonumber(ARGV[12 + 3 * i])
  local current = next_value[counter]
  if current == nil then
    current = tonumber(redis.call('HGET', KEYS[2], counter) or '0')
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
    redis.call('HDEL', KEYS[2], counter)
  else
    redis.call('HSET', KEYS[2], counter, string.format('%d', value))
  end
end

if receipt == '' then return {'written'} end

redis.call('HSET', KEYS[3], receipt, ARGV[4])
redis.call('HSET', KEYS[1], receipt, ARGV[3])
redis.call('ZADD', KEYS[4], 0, receipt)

-- Filed under the time it became unsettled; moved or removed as that changes.
local was = redis.call('HGET', KEYS[6], receipt)
local now = ARGV[5]
if (was or '') ~= now then
  if was then redis.call('ZREM', KEYS[5], was) end
  if now ~= '' then
    redis.call('ZADD', KEYS[5], 0, now)
    redis.call('HSET', KEYS[6], receipt, now)
  else
    redis.call('HDEL', KEYS[6], receipt)
  end
end

if ARGV[6] ~= '' then redis.call('ZADD', KEYS[8], 0, ARGV[8]) end
return {'written'}

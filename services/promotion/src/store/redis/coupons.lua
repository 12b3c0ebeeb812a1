-- Inserts a batch of new coupons, all or none.
--
-- KEYS[1]: the tenant's coupons; KEYS[2]: its coupon batches (one hash tag).
-- ARGV[1]: the batch's idempotency key ('' : none); ARGV[2]: the batch's codes, encoded;
-- then code and coupon (encoded) for each.
--
-- Returns {'done'}, {'repeat', codes of the first batch under that key} or
-- {'exists', code}.
if ARGV[1] ~= '' then
  local first = redis.call('HGET', KEYS[2], ARGV[1])
  if first then return {'repeat', first} end
end
local seen = {}
for i = 3, #ARGV, 2 do
  if seen[ARGV[i]] or redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    return {'exists', ARGV[i]}
  end
  seen[ARGV[i]] = true
end
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return {'done'}

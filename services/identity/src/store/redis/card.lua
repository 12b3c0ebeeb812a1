-- Writes cards if their stored statuses are the expected ones: one card (an update), or
-- an old card and its replacement together.
-- KEYS: cards, card states, the card set of the member the last card is bound to (if any)
-- ARGV: n, n x (number, expected status code ('' for none stored), card, state)
-- Answers 0 when written, else the position (1-based) of the first card not as expected.
local n = tonumber(ARGV[1])
for j = 0, n - 1 do
  local at = 2 + j * 4
  local code = card_state(KEYS[2], ARGV[at])
  if (code or '') ~= ARGV[at + 1] then return j + 1 end
end
for j = 0, n - 1 do
  local at = 2 + j * 4
  redis.call('HSET', KEYS[1], ARGV[at], ARGV[at + 2])
  redis.call('HSET', KEYS[2], ARGV[at], ARGV[at + 3])
end
if KEYS[3] then redis.call('SADD', KEYS[3], ARGV[2 + (n - 1) * 4]) end
return 0

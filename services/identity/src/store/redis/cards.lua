-- Inserts the cards whose numbers are not stored yet; answers how many.
-- KEYS: cards, card states, then the card sets of the members the cards are bound to
-- ARGV: n, n x (number, card, state, index in KEYS of its member's set, 0 for none)
local created = 0
for j = 0, tonumber(ARGV[1]) - 1 do
  local at = 2 + j * 4
  local number = ARGV[at]
  if redis.call('HEXISTS', KEYS[1], number) == 0 then
    redis.call('HSET', KEYS[1], number, ARGV[at + 1])
    redis.call('HSET', KEYS[2], number, ARGV[at + 2])
    local set = tonumber(ARGV[at + 3])
    if set > 0 then redis.call('SADD', KEYS[set], number) end
    created = created + 1
  end
end
return created

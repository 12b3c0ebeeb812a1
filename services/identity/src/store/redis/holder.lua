-- The POS lookup: a card, the member it is bound to while active, and that member's profile
-- while the member is active, read together. The hot path: states are read by their first
-- bytes, not split.
-- KEYS: cards, card states, members, profiles, meta
-- ARGV: card number
local card = redis.call('HGET', KEYS[1], ARGV[1])
if not card then return {} end
-- An active card's state is 'A', the separator, then its member.
local state = redis.call('HGET', KEYS[2], ARGV[1])
if not state or string.byte(state, 1) ~= 65 or string.byte(state, 2) ~= 31 then return {card} end
local member = string.sub(state, 3)
if member == '' then return {card} end
local m = redis.call('HGET', KEYS[3], member)
if not m then return {card} end
-- An active member's meta starts with 'A' and the separator.
local meta = redis.call('HGET', KEYS[5], member)
if not meta or string.byte(meta, 1) ~= 65 or string.byte(meta, 2) ~= 31 then return {card, m} end
local p = redis.call('HGET', KEYS[4], member)
if not p then return {card, m} end
return {card, m, p}

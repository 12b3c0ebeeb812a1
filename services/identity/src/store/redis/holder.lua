-- The POS lookup: a card, the member it is bound to while active, and that member's profile
-- while the member is active, read together.
-- KEYS: cards, card states, members, profiles, meta
-- ARGV: card number
local card = redis.call('HGET', KEYS[1], ARGV[1])
if not card then return {} end
local code, member = card_state(KEYS[2], ARGV[1])
if code ~= 'A' or not member or member == '' then return {card} end
local m = redis.call('HGET', KEYS[3], member)
if not m then return {card} end
local meta = meta_of(KEYS[5], member)
local p = meta and meta.status == 'A' and redis.call('HGET', KEYS[4], member)
if not p then return {card, m} end
return {card, m, p}

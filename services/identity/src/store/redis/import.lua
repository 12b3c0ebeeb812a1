-- Inserts an imported member with its profile, cards and import row, or nothing.
-- The caller read the cards; when one changed since, nothing is written ('retry').
-- KEYS: phones, emails, codes, members, profiles, meta, member ids, cards, card states,
--       the member's cards, import rows
-- ARGV: member id, phone, email, code, member record, profile record, meta, row field,
--       row record, n, n x (card number, card as read ('' when none), card, state,
--       '1' when the card is bound to this member, '1' when it is taken as read)
-- Answers 'done', 'phone', 'email', 'code', 'card:<number>' or 'retry'.
local id = ARGV[1]
if not free_for(KEYS[1], ARGV[2], id) then return 'phone' end
if not free_for(KEYS[2], ARGV[3], id) then return 'email' end
if not free_for(KEYS[3], ARGV[4], id) then return 'code' end
local i = 10
local n = tonumber(ARGV[i])
for j = 0, n - 1 do
  local at = i + 1 + j * 6
  if (redis.call('HGET', KEYS[8], ARGV[at]) or '') ~= ARGV[at + 1] then return 'retry' end
end
for j = 0, n - 1 do
  local at = i + 1 + j * 6
  if ARGV[at + 5] == '1' then return 'card:' .. ARGV[at] end
end
for j = 0, n - 1 do
  local at = i + 1 + j * 6
  redis.call('HSET', KEYS[8], ARGV[at], ARGV[at + 2])
  redis.call('HSET', KEYS[9], ARGV[at], ARGV[at + 3])
  if ARGV[at + 4] == '1' then redis.call('SADD', KEYS[10], ARGV[at]) end
end
redis.call('HSET', KEYS[1], ARGV[2], id)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[3], id) end
redis.call('HSET', KEYS[3], ARGV[4], id)
redis.call('HSET', KEYS[4], id, ARGV[5])
redis.call('HSET', KEYS[5], id, ARGV[6])
redis.call('HSET', KEYS[6], id, ARGV[7])
redis.call('ZADD', KEYS[7], 0, id)
redis.call('HSET', KEYS[11], ARGV[8], ARGV[9])
return 'done'

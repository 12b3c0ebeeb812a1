-- Merges a duplicate into a survivor: its cards, phone, email and code entries move to the
-- survivor, its record, profile and merge record are written. The caller read the
-- duplicate's cards and the members merged into it; when either changed since, nothing
-- is written and the answer is 'retry'.
-- KEYS: members, profiles, meta, cards, card states, duplicate's cards, survivor's cards,
--       phones, emails, codes, merge records, unmoved merges, merged into the survivor,
--       merged into the duplicate
-- ARGV: duplicate id, expected version, survivor id, member record, profile record, meta,
--       merge record, points moved ('1' or '0'), n, n member ids (merged into the duplicate
--       at any depth), m, m x (card number, card as read, card moved, state moved)
local dup, surv = ARGV[1], ARGV[3]
local d = meta_of(KEYS[3], dup)
if not d or d.status ~= 'A' or d.version ~= ARGV[2] then return 'no' end
local s = meta_of(KEYS[3], surv)
if not s or s.status ~= 'A' then return 'no' end
local i = 9
local family = {}
for _ = 1, tonumber(ARGV[i]) do
  i = i + 1
  family[ARGV[i]] = true
  -- A member merged into the duplicate whose points have not arrived holds it back.
  if redis.call('SISMEMBER', KEYS[12], ARGV[i]) == 1 then return 'no' end
end
i = i + 1
for _, m in ipairs(redis.call('SMEMBERS', KEYS[14])) do
  if not family[m] then return 'retry' end
end
local n = tonumber(ARGV[i])
local moved = {}
for _ = 1, n do
  local number, read, card, state = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  i = i + 4
  if (redis.call('HGET', KEYS[4], number) or '') ~= read then return 'retry' end
  moved[number] = {card, state}
end
local held = redis.call('SMEMBERS', KEYS[6])
if #held ~= n then return 'retry' end
for _, number in ipairs(held) do
  if not moved[number] then return 'retry' end
end
for number, v in pairs(moved) do
  redis.call('HSET', KEYS[4], number, v[1])
  redis.call('HSET', KEYS[5], number, v[2])
  redis.call('SADD', KEYS[7], number)
end
redis.call('DEL', KEYS[6])
repoint(KEYS[8], d.phone, dup, surv)
repoint(KEYS[9], d.email, dup, surv)
repoint(KEYS[10], d.code, dup, surv)
redis.call('HSET', KEYS[1], dup, ARGV[4])
redis.call('HSET', KEYS[2], dup, ARGV[5])
redis.call('HSET', KEYS[3], dup, ARGV[6])
redis.call('HSET', KEYS[11], dup, ARGV[7])
if ARGV[8] == '1' then
  redis.call('SREM', KEYS[12], dup)
else
  redis.call('SADD', KEYS[12], dup)
end
redis.call('SADD', KEYS[13], dup)
return 'yes'

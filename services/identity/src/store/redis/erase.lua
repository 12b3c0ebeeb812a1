-- Erases a member and every member merged into it: records replaced by the caller's, index
-- entries pointing at any of them removed, block records removed, erasure records
-- written. The caller read the family and the versions of its merged members; when the
-- family grew or one of those versions moved since, nothing is written ('retry').
-- KEYS: members, profiles, meta, phones, emails, codes, erasures, blocks, merged into the
--       root
-- ARGV: root id, expected version, erasure record, n, n x (member id, version read,
--       member record, profile record, meta), root first
local root = ARGV[1]
local r = meta_of(KEYS[3], root)
if not r or (r.status ~= 'A' and r.status ~= 'B') or r.version ~= ARGV[2] then return 'no' end
local family, entries, i = {}, {}, 5
for _ = 1, tonumber(ARGV[4]) do
  local e = {id = ARGV[i], version = ARGV[i + 1], member = ARGV[i + 2], profile = ARGV[i + 3], meta = ARGV[i + 4]}
  i = i + 5
  family[e.id] = true
  table.insert(entries, e)
end
for _, m in ipairs(redis.call('SMEMBERS', KEYS[9])) do
  if not family[m] then return 'retry' end
end
local stored = {}
for j, e in ipairs(entries) do
  local m = meta_of(KEYS[3], e.id)
  if j > 1 and m and m.version ~= e.version then return 'retry' end
  stored[j] = m
end
for j, e in ipairs(entries) do
  local m = stored[j]
  if m then
    redis.call('HDEL', KEYS[8], e.id)
    unindex_any(KEYS[4], m.phone, family)
    unindex_any(KEYS[5], m.email, family)
    unindex_any(KEYS[6], m.code, family)
    redis.call('HSET', KEYS[1], e.id, e.member)
    redis.call('HSET', KEYS[2], e.id, e.profile)
    redis.call('HSET', KEYS[3], e.id, e.meta)
    redis.call('HSET', KEYS[7], e.id, ARGV[3])
  end
end
return 'yes'

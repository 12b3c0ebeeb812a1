-- Shared by every identity script (prepended to each).
--
-- A member's meta field holds what conditional writes check and what index entries it
-- owns: status, profile version, phone, email and referral code, separated by \31.
local SEP = '\31'

local function split(raw)
  local fields, start = {}, 1
  while true do
    local i = string.find(raw, SEP, start, true)
    if not i then
      table.insert(fields, string.sub(raw, start))
      return fields
    end
    table.insert(fields, string.sub(raw, start, i - 1))
    start = i + 1
  end
end

local function meta_of(key, id)
  local raw = redis.call('HGET', key, id)
  if not raw then return nil end
  local f = split(raw)
  return {status = f[1], version = f[2], phone = f[3] or '', email = f[4] or '', code = f[5] or ''}
end

-- A card's state field: its status code and the member it is bound to ('' for none).
local function card_state(key, number)
  local raw = redis.call('HGET', key, number)
  if not raw then return nil, nil end
  local f = split(raw)
  return f[1], f[2] or ''
end

-- Whether `value` of index hash `key` is free, or points at `member` already.
local function free_for(key, value, member)
  if value == '' then return true end
  local owner = redis.call('HGET', key, value)
  return (not owner) or owner == member
end

-- Points `value`'s entry at `to` when it points at `from`.
local function repoint(key, value, from, to)
  if value ~= '' and redis.call('HGET', key, value) == from then
    redis.call('HSET', key, value, to)
  end
end

-- Removes `value`'s entry when it points at `member`.
local function unindex(key, value, member)
  if value ~= '' and redis.call('HGET', key, value) == member then
    redis.call('HDEL', key, value)
  end
end

-- Removes `value`'s entry when it points at any member of the set `members`.
local function unindex_any(key, value, members)
  if value == '' then return end
  local owner = redis.call('HGET', key, value)
  if owner and members[owner] then
    redis.call('HDEL', key, value)
  end
end

-- Applies one ledger operation to one member's hot state, atomically. The same rules as
-- `ledger::apply` in Rust; the differential test keeps the two in step.
--
-- KEYS[1]: the member's state (MessagePack `Account`); KEYS[2]: the member's records
-- (hash: idempotency key -> MessagePack `OpRecord`); KEYS[3]: when each record was last
-- written (sorted set: idempotency key, scored by time in ms). All share one hash tag.
-- ARGV: now (ms), idempotency key ('' for the keyless expiry), fingerprint,
-- operation (MessagePack `Op`), key of the record the operation refers to ('' for none),
-- how long records are kept (ms; 0: for ever), '1' when the referenced record is known
-- to be absent from the ledger too.
--
-- Records are a cache of the ledger's: a change drops the records last written more than
-- the retention before `now` (a bounded number per call), and the records expire as a whole
-- once the member has had no change for the retention. A missing record is found in the
-- ledger by the caller: a retry under a dropped key is decided again and refused by the
-- ledger, which holds the record the caller then answers with; a dropped record the
-- operation refers to is asked for.
--
-- Returns {0, record} for a replay, {1, change, record} for an applied change (a keyless
-- operation's record is not kept), {2} when the state is not loaded (the caller rebuilds it from the
-- ledger and retries), {3, version} when a keyless operation changed nothing, {4} when the
-- record the operation refers to is not here (the caller puts the ledger's copy back, or
-- says it has none, and retries), {5, code, message, version, stamp} for a refusal, which
-- changes no state or record (it may drop records without write times): the caller lets it stand only once it knows the state it was decided on
-- (that version and stamp) is the ledger's.

local MAX_LOTS = 10000
local MAX_OPEN_HOLDS = 100
local MAX_BALANCE = 1000000000000000

local now = tonumber(ARGV[1])
local key = ARGV[2]
local fingerprint = ARGV[3]
local ref_key = ARGV[5]
local retention = tonumber(ARGV[6])
local ref_absent = ARGV[7] == '1'
-- Most dropped records one call deletes; the rest go with the next changes.
local TRIM_BATCH = 64

local function fail(code, msg)
  error({ code = code, msg = msg })
end

local function active_at(lot, t)
  return lot.activate_at <= t and (lot.expire_at == nil or t < lot.expire_at)
end

local function return_parts(acc, source, parts, at)
  for _, p in ipairs(parts) do
    if p.amount > 0 then
      acc.lots[#acc.lots + 1] =
        { source = source, remaining = p.amount, activate_at = at, expire_at = p.expire_at }
    end
  end
end

local function release_expired_holds(acc, t)
  local open, expired = {}, {}
  for _, h in ipairs(acc.holds) do
    if h.expire_at <= t then
      expired[#expired + 1] = h
    else
      open[#open + 1] = h
    end
  end
  acc.holds = open
  for _, h in ipairs(expired) do
    return_parts(acc, h.key, h.parts, h.expire_at)
  end
  return #expired > 0
end

local function view(acc, t)
  local v = {
    active = 0, pending = 0, held = 0,
    lifetime_accrued = acc.lifetime_accrued,
    lifetime_redeemed = acc.lifetime_redeemed,
    lifetime_expired = acc.lifetime_expired,
    seq = acc.seq,
  }
  for _, h in ipairs(acc.holds) do
    v.held = v.held + h.amount
  end
  local next_amount, next_at = nil, nil
  for _, lot in ipairs(acc.lots) do
    if active_at(lot, t) then
      v.active = v.active + lot.remaining
      if lot.expire_at ~= nil then
        if next_at == nil or lot.expire_at < next_at then
          next_amount, next_at = lot.remaining, lot.expire_at
        elseif lot.expire_at == next_at then
          next_amount = next_amount + lot.remaining
        end
      end
    elseif lot.activate_at > t then
      v.pending = v.pending + lot.remaining
    end
  end
  if next_at ~= nil then
    v.next_expiry = { next_amount, next_at }
  end
  return v
end

-- Consumes up to `amount` from active lots, earliest expiry first (never-expiring last,
-- ties in lot order), skipping lots from `skip`. Returns the parts taken, by expiry.
local function take_earliest_expiry(acc, amount, t, skip)
  local order = {}
  for i, lot in ipairs(acc.lots) do
    if active_at(lot, t) and lot.source ~= skip then
      order[#order + 1] = i
    end
  end
  table.sort(order, function(a, b)
    local la, lb = acc.lots[a], acc.lots[b]
    local na, nb = la.expire_at == nil, lb.expire_at == nil
    if na ~= nb then
      return nb
    end
    if not na and la.expire_at ~= lb.expire_at then
      return la.expire_at < lb.expire_at
    end
    return a < b
  end)
  local left, parts = amount, {}
  for _, i in ipairs(order) do
    if left == 0 then
      break
    end
    local lot = acc.lots[i]
    local take = math.min(left, lot.remaining)
    if take > 0 then
      lot.remaining = lot.remaining - take
      left = left - take
      local last = parts[#parts]
      if last ~= nil and last.expire_at == lot.expire_at then
        last.amount = last.amount + take
      else
        parts[#parts + 1] = { expire_at = lot.expire_at, amount = take, returned = 0 }
      end
    end
  end
  return parts
end

local function take_back_accrual(acc, source, amount, t)
  local taken = 0
  for _, lot in ipairs(acc.lots) do
    if lot.source == source then
      taken = math.min(amount, lot.remaining)
      lot.remaining = lot.remaining - taken
      break
    end
  end
  if taken < amount then
    for _, p in ipairs(take_earliest_expiry(acc, amount - taken, t, source)) do
      taken = taken + p.amount
    end
  end
  return taken
end

local function give_back(acc, original, amount, t)
  local left = amount
  for i = #original.parts, 1, -1 do
    if left == 0 then
      break
    end
    local part = original.parts[i]
    local give = math.min(left, part.amount - part.returned)
    if give > 0 then
      part.returned = part.returned + give
      left = left - give
      acc.lots[#acc.lots + 1] =
        { source = key, remaining = give, activate_at = t, expire_at = part.expire_at }
    end
  end
end

local function insufficient(active, requested)
  fail('FAILED_PRECONDITION', 'insufficient points: ' .. string.format('%d', active) ..
    ' active, ' .. string.format('%d', requested) .. ' requested')
end

local function find_hold(acc, hold_key)
  for i, h in ipairs(acc.holds) do
    if h.key == hold_key then
      return i
    end
  end
  return nil
end

-- The member's state as read, for a refusal to say what it was decided on.
local raw = nil

local function main()
  raw = redis.call('GET', KEYS[1])
  if not raw then
    return { 2 }
  end
  local keyed = key ~= ''
  if keyed and retention > 0 and redis.call('EXISTS', KEYS[3]) == 0 then
    -- Records without write times (kept before there was a retention) are dropped, so
    -- that none stays for ever; the ledger has them all.
    redis.call('DEL', KEYS[2])
  end
  if keyed then
    local stored = redis.call('HGET', KEYS[2], key)
    if stored then
      if cmsgpack.unpack(stored).fingerprint == fingerprint then
        return { 0, stored }
      end
      fail('ALREADY_EXISTS', 'idempotency key ' .. key .. ' was already used for a different operation')
    end
  end
  local op = cmsgpack.unpack(ARGV[4])
  local name, body
  if type(op) == 'string' then
    name, body = op, {}
  else
    name, body = next(op)
  end
  local acc = cmsgpack.unpack(raw)
  if acc.merged_into ~= nil and keyed then
    -- The same words as `ledger::MERGED`: balance follows the merge on this refusal.
    fail('FAILED_PRECONDITION', 'the member was merged into ' .. acc.merged_into)
  end
  local prev_stamp = acc.stamp or ''
  local referenced = nil
  if ref_key ~= '' then
    local r = redis.call('HGET', KEYS[2], ref_key)
    if r then
      referenced = cmsgpack.unpack(r)
    elseif not ref_absent then
      return { 4 }
    end
  end
  local referenced_changed = false
  local changed = release_expired_holds(acc, now)
  local entries = {}
  local function entry(reason, delta, reference, activate_at, expire_at, actor)
    if delta == 0 then
      return nil
    end
    acc.seq = acc.seq + 1
    acc.total = acc.total + delta
    local e = {
      seq = acc.seq, reason = reason, amount = delta, balance_after = acc.total,
      key = key, reference = reference, created_at = now,
      activate_at = activate_at, expire_at = expire_at, actor = actor,
    }
    entries[#entries + 1] = e
    return e
  end
  local record = {
    fingerprint = fingerprint, kind = 'Other', amount = 0, reversed = 0, parts = {},
    reply = { unrecovered = 0, moved = 0, lots = {} },
  }

  if name == 'Accrue' then
    if #acc.lots >= MAX_LOTS then
      fail('FAILED_PRECONDITION', 'the member already has ' .. MAX_LOTS .. ' lots')
    end
    local activate = body.activate_at or now
    acc.lots[#acc.lots + 1] =
      { source = key, remaining = body.amount, activate_at = activate, expire_at = body.expire_at }
    acc.lifetime_accrued = acc.lifetime_accrued + body.amount
    record.kind, record.amount = 'Credit', body.amount
    record.reply.entry = entry(body.reason, body.amount, body.reference, activate, body.expire_at, nil)
  elseif name == 'Redeem' then
    local active = view(acc, now).active
    if body.amount > active and not body.up_to_available then
      insufficient(active, body.amount)
    end
    local take = math.min(body.amount, active)
    record.parts = take_earliest_expiry(acc, take, now, nil)
    acc.lifetime_redeemed = acc.lifetime_redeemed + take
    record.kind, record.amount = 'Debit', take
    record.reply.entry = entry('Redemption', -take, body.reference, nil, nil, nil)
  elseif name == 'Reverse' then
    local original = referenced
    if original == nil then
      fail('NOT_FOUND', 'no operation with idempotency key ' .. body.original_key)
    end
    local left = original.amount - original.reversed
    if (original.kind == 'Credit' or original.kind == 'Debit') and body.amount > left then
      fail('FAILED_PRECONDITION', 'only ' .. string.format('%d', left) .. ' of operation ' ..
        body.original_key .. ' is left to reverse')
    end
    if original.kind == 'Credit' then
      local taken = take_back_accrual(acc, body.original_key, body.amount, now)
      -- Held points come back when their hold is cancelled or times out: wait for the holds
      -- rather than count them unrecovered (the same rule as ledger.rs).
      local held = 0
      for _, h in ipairs(acc.holds) do held = held + h.amount end
      if taken < body.amount and held > 0 then
        fail('FAILED_PRECONDITION', 'the points to take back are held: ' ..
          string.format('%d', math.min(body.amount - taken, held)) .. ' of the ' ..
          string.format('%d', body.amount) ..
          ' points to take back are in open holds; retry once they are confirmed, cancelled or timed out')
      end
      record.reply.unrecovered = body.amount - taken
      original.reversed = original.reversed + body.amount
      acc.lifetime_accrued = acc.lifetime_accrued - math.min(taken, acc.lifetime_accrued)
      record.reply.entry = entry('RefundReversal', -taken, body.reference, nil, nil, nil)
    elseif original.kind == 'Debit' then
      give_back(acc, original, body.amount, now)
      original.reversed = original.reversed + body.amount
      acc.lifetime_redeemed = acc.lifetime_redeemed - math.min(body.amount, acc.lifetime_redeemed)
      record.reply.entry = entry('RedemptionReversal', body.amount, body.reference, nil, nil, nil)
    else
      fail('FAILED_PRECONDITION', 'operation ' .. body.original_key ..
        ' moved no points that could be reversed')
    end
    referenced_changed = true
  elseif name == 'Hold' then
    if #acc.holds >= MAX_OPEN_HOLDS then
      fail('FAILED_PRECONDITION', 'the member already has ' .. MAX_OPEN_HOLDS .. ' open holds')
    end
    local active = view(acc, now).active
    if body.amount > active then
      insufficient(active, body.amount)
    end
    local parts = take_earliest_expiry(acc, body.amount, now, nil)
    local expire_at = now + body.timeout_ms
    acc.holds[#acc.holds + 1] = { key = key, amount = body.amount, parts = parts, expire_at = expire_at }
    changed = true
    record.kind, record.amount, record.parts = 'Hold', body.amount, parts
    record.hold, record.hold_expire_at = 'Open', expire_at
    record.reply.hold = 'Open'
  elseif name == 'Confirm' then
    local hold_key = body.hold_key
    if referenced == nil or referenced.kind ~= 'Hold' then
      fail('NOT_FOUND', 'no hold with idempotency key ' .. hold_key)
    end
    if referenced.hold == 'Confirmed' then
      fail('FAILED_PRECONDITION', 'hold ' .. hold_key .. ' is already confirmed')
    elseif referenced.hold == 'Cancelled' then
      fail('FAILED_PRECONDITION', 'hold ' .. hold_key .. ' is cancelled')
    end
    local i = find_hold(acc, hold_key)
    if i == nil then
      fail('FAILED_PRECONDITION', 'hold ' .. hold_key .. ' expired and its points were released')
    end
    local hold = acc.holds[i]
    local confirm = body.amount
    if confirm == 0 then
      confirm = hold.amount
    end
    if confirm > hold.amount then
      fail('FAILED_PRECONDITION', 'hold ' .. hold_key .. ' reserves ' ..
        string.format('%d', hold.amount) .. ', ' .. string.format('%d', confirm) .. ' requested')
    end
    table.remove(acc.holds, i)
    local left, confirmed, rest = confirm, {}, {}
    for _, part in ipairs(hold.parts) do
      local take = math.min(left, part.amount)
      left = left - take
      if take > 0 then
        confirmed[#confirmed + 1] = { expire_at = part.expire_at, amount = take, returned = 0 }
      end
      if part.amount > take then
        rest[#rest + 1] = { expire_at = part.expire_at, amount = part.amount - take, returned = 0 }
      end
    end
    return_parts(acc, hold_key, rest, now)
    acc.lifetime_redeemed = acc.lifetime_redeemed + confirm
    referenced.hold = 'Confirmed'
    referenced_changed = true
    record.kind, record.amount, record.parts = 'Debit', confirm, confirmed
    record.reply.hold = 'Confirmed'
    record.reply.entry = entry('Redemption', -confirm, hold_key, nil, nil, nil)
  elseif name == 'Cancel' then
    local hold_key = body.hold_key
    if referenced == nil or referenced.kind ~= 'Hold' then
      fail('NOT_FOUND', 'no hold with idempotency key ' .. hold_key)
    end
    if referenced.hold == 'Confirmed' then
      fail('FAILED_PRECONDITION', 'hold ' .. hold_key .. ' is already confirmed')
    elseif referenced.hold == 'Cancelled' then
      record.reply.hold = 'Cancelled'
    else
      local i = find_hold(acc, hold_key)
      if i == nil then
        record.reply.hold = 'Expired'
      else
        local hold = table.remove(acc.holds, i)
        return_parts(acc, hold_key, hold.parts, now)
        referenced.hold = 'Cancelled'
        referenced_changed = true
        record.reply.hold = 'Cancelled'
        changed = true
      end
    end
  elseif name == 'Activate' then
    local only = body.accrual_key
    if only ~= nil and (referenced == nil or referenced.kind ~= 'Credit') then
      fail('NOT_FOUND', 'no accrual with idempotency key ' .. only)
    end
    local activated = 0
    for _, lot in ipairs(acc.lots) do
      local pending = lot.activate_at > now and (lot.expire_at == nil or now < lot.expire_at)
      if pending and (only == nil or lot.source == only) then
        lot.activate_at = now
        activated = activated + lot.remaining
      end
    end
    if activated > 0 then
      changed = true
    end
    record.reply.moved = activated
  elseif name == 'Adjust' then
    local amount = body.amount
    if amount > 0 then
      if #acc.lots >= MAX_LOTS then
        fail('FAILED_PRECONDITION', 'the member already has ' .. MAX_LOTS .. ' lots')
      end
      acc.lots[#acc.lots + 1] =
        { source = key, remaining = amount, activate_at = now, expire_at = body.expire_at }
      record.kind, record.amount = 'Credit', amount
    else
      local active = view(acc, now).active
      if -amount > active then
        insufficient(active, -amount)
      end
      record.parts = take_earliest_expiry(acc, -amount, now, nil)
      record.kind, record.amount = 'Debit', -amount
    end
    local expire_at = nil
    if amount > 0 then
      expire_at = body.expire_at
    end
    record.reply.entry = entry('ManualAdjustment', amount, body.actor.comment, nil, expire_at,
      { id = body.actor.id, comment = body.actor.comment })
  elseif name == 'Expire' then
    local expired = 0
    for _, lot in ipairs(acc.lots) do
      if lot.expire_at ~= nil and lot.expire_at <= now then
        expired = expired + lot.remaining
        lot.remaining = 0
      end
    end
    acc.lifetime_expired = acc.lifetime_expired + expired
    record.reply.entry = entry('Expiry', -expired, '', nil, nil, nil)
  elseif name == 'TransferOut' then
    if #acc.holds > 0 then
      fail('FAILED_PRECONDITION', 'the member has open holds; confirm or cancel them first')
    end
    local lots, moved = acc.lots, 0
    for _, lot in ipairs(lots) do
      moved = moved + lot.remaining
    end
    acc.lots = {}
    acc.merged_into = body.to_member
    changed = true
    record.reply.moved, record.reply.lots = moved, lots
    record.reply.entry = entry('MergeTransfer', -moved, body.to_member, nil, nil, nil)
  elseif name == 'TransferIn' then
    if #acc.lots + #body.lots > MAX_LOTS then
      fail('FAILED_PRECONDITION', 'the member would have more than ' .. MAX_LOTS .. ' lots')
    end
    local moved = 0
    for _, lot in ipairs(body.lots) do
      moved = moved + lot.remaining
      acc.lots[#acc.lots + 1] = lot
    end
    record.reply.moved = moved
    record.reply.entry = entry('MergeTransfer', moved, body.from_member, nil, nil, nil)
  elseif name == 'Adopt' then
    -- A merged member's accrual or redemption, taken over under the same key: moves nothing.
    local r = body.record
    record.kind, record.amount, record.reversed, record.parts = r.kind, r.amount, r.reversed, r.parts
  else
    fail('INVALID_ARGUMENT', 'unknown operation ' .. tostring(name))
  end

  if acc.total > MAX_BALANCE or acc.lifetime_accrued > MAX_BALANCE then
    fail('FAILED_PRECONDITION', "the member's balance would exceed " .. string.format('%d', MAX_BALANCE))
  end
  -- Active lots expiring together merge into the first of them (as `consolidate` in Rust).
  local first = {}
  for i, lot in ipairs(acc.lots) do
    if lot.activate_at <= now and lot.remaining > 0 then
      local bucket = lot.expire_at
      if bucket == nil then
        bucket = 'never'
      end
      local j = first[bucket]
      if j == nil then
        first[bucket] = i
      else
        acc.lots[j].remaining = acc.lots[j].remaining + lot.remaining
        lot.remaining = 0
      end
    end
  end
  local kept = {}
  for _, lot in ipairs(acc.lots) do
    if lot.remaining > 0 then
      kept[#kept + 1] = lot
    end
  end
  acc.lots = kept
  if not (#entries > 0 or changed or keyed) then
    return { 3, acc.version }
  end
  acc.version = acc.version + 1
  acc.stamp = redis.sha1hex(prev_stamp .. '\0' .. key .. '\0' .. fingerprint .. '\0' ..
    ARGV[1] .. '\0' .. string.format('%d', acc.version))
  record.reply.balance = view(acc, now)
  local records = {}
  if referenced ~= nil and referenced_changed then
    local packed = cmsgpack.pack(referenced)
    redis.call('HSET', KEYS[2], ref_key, packed)
    if retention > 0 then
      redis.call('ZADD', KEYS[3], now, ref_key)
    end
    records[#records + 1] = { ref_key, referenced }
  end
  -- A keyless operation keeps no record, but its caller still learns what it did.
  local packed_record = cmsgpack.pack(record)
  if keyed then
    redis.call('HSET', KEYS[2], key, packed_record)
    if retention > 0 then
      redis.call('ZADD', KEYS[3], now, key)
    end
    records[#records + 1] = { key, record }
  end
  if retention > 0 then
    local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%d', now - retention),
      'LIMIT', 0, TRIM_BATCH)
    if #old > 0 then
      redis.call('HDEL', KEYS[2], unpack(old))
      redis.call('ZREM', KEYS[3], unpack(old))
    end
    redis.call('PEXPIRE', KEYS[2], retention)
    redis.call('PEXPIRE', KEYS[3], retention)
  end
  redis.call('SET', KEYS[1], cmsgpack.pack(acc))
  local change = {
    key = key, prev_stamp = prev_stamp, at = now, account = acc, entries = entries, records = records,
  }
  return { 1, cmsgpack.pack(change), packed_record }
end

local ok, result = pcall(main)
if ok then
  return result
end
if type(result) == 'table' and result.code then
  local acc = cmsgpack.unpack(raw)
  return { 5, result.code, result.msg, acc.version, acc.stamp or '' }
end
error(result)

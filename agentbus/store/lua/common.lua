-- Helpers shared by the agentbus scripts; Python prepends this file to each script body.
--
-- Head meta strings are "version|deleted|seq|updated_at|updated_by" (updated_by last, so it
-- may contain anything). Keys never contain "|" (core/names.py KEY_RE).

-- Byte-wise a < b. Lua's own "<" uses strcoll(), and Redis calls setlocale(LC_COLLATE, ""),
-- so on a server with a non-C locale "<" would not be the byte order that ZRANGEBYLEX, the
-- SQL stores (COLLATE "C") and core.model.RangeRead.contains use.
local function bytes_lt(a, b)
  if a == b then return false end
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- HMGET in slices: unpack() of thousands of arguments would overflow the Lua C stack.
local function hmget(key, fields)
  local out = {}
  local i = 1
  while i <= #fields do
    local j = math.min(i + 999, #fields)
    local part = redis.call('HMGET', key, unpack(fields, i, j))
    for k = 1, #part do out[#out + 1] = part[k] end
    i = j + 1
  end
  return out
end

-- Record one delivered read in the session's epoch (a hash: header fields tok, started_at,
-- n, overflow, gen, plus one "p:<key>" or "r:<range ident>" field per entry). Mirrors
-- SQLStore._record: create the header if missing (expiring after the retention period,
-- counted from the start like SQLStore.purge), stop at overflow, keep the FIRST value
-- recorded, and when full overflow only on a read that is not recorded yet. Every change
-- that matters to a commit bumps gen, so a commit that loaded the epoch before this read
-- sees the change and reloads. Returns what this call did: 'a' added the entry, 'o' set
-- overflow, 'n' nothing (the Python shadow of the epoch follows it by this and gen).
local function record(ep, field, val, now, maxn, retention_ms, tok)
  local hdr = redis.call('HMGET', ep, 'n', 'overflow')
  if not hdr[1] then
    redis.call('HSET', ep, 'tok', tok, 'started_at', now, 'n', '0', 'overflow', '0', 'gen', '0')
    redis.call('PEXPIRE', ep, retention_ms)
    hdr = {'0', '0'}
  end
  if hdr[2] == '1' then return 'n' end
  if tonumber(hdr[1]) >= tonumber(maxn) then
    -- Full: a read already recorded needs no entry; a new one cannot be recorded.
    if redis.call('HEXISTS', ep, field) == 0 then
      redis.call('HSET', ep, 'overflow', '1')
      redis.call('HINCRBY', ep, 'gen', 1)
      return 'o'
    end
    return 'n'
  end
  if redis.call('HSETNX', ep, field, val) == 1 then
    redis.call('HINCRBY', ep, 'n', 1)
    redis.call('HINCRBY', ep, 'gen', 1)
    return 'a'
  end
  return 'n'
end

-- Validate a commit's guards and apply its writes, atomically (one space = one hash slot).
--
-- The guards come from core.validation.build_guards in Python; this script only repeats the
-- yes/no check (core.validation.point_ok and RangeRead.contains) so that validation and apply
-- are one atomic step. On a conflict it returns what it observed and Python explains the
-- conflict with core.validation.find_conflicts: no conflict wording lives here.
--
-- KEYS: 1 space hash (seq, created_at), 2 meta hash, 3 value hash, 4 live zset (lex),
--       5 changed zset (key -> last seq), 6 commit log list, 7 epoch hash,
--       8 .. 7+nw history list of each write, [8+nw] idempotency record (if any)
-- ARGV: 1 now, 2 commit_id, 3 epoch tag "tok:gen" as Python loaded it ("" = no epoch),
--       4 idempotency ttl ms, 5 request fingerprint, 6 commit log record head (a JSON
--       object without its closing brace), 7 updated_by, 8 np, 9 nr, 10 nw,
--       11 pending-marker ttl ms,
--       then np x (key, version, kind "r"|"e"), nr x (prefix, start_after, end_at, seq) where
--       a bound is "-" for none or "=" followed by the key, nw x (key, key as JSON, deleted
--       "0"|"1", value JSON or "").
-- Returns one of
--   {"R", record}                      an idempotency record exists (final or pending)
--   {"E"}                              the epoch changed since Python loaded it: reload
--   {"C", guard keys, their metas, changed keys, their metas, created}   conflict, nothing applied
--   {"OK", seq, {versions in write order}, created}
-- where created is 1 if this call created the space (so Python registers it in the tenant's
-- set of spaces even if it believed it registered already: a reset may have removed it).
local now = ARGV[1]
local np, nr, nw = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local idem = KEYS[8 + nw]

-- Like SQLStore._lock_space: every commit attempt creates the space.
local created = redis.call('HSETNX', KEYS[1], 'created_at', now)

if idem then
  local rec = redis.call('GET', idem)
  if rec then return {'R', rec} end
end

local hdr = redis.call('HMGET', KEYS[7], 'tok', 'gen')
local tag = ''
if hdr[1] then tag = hdr[1] .. ':' .. (hdr[2] or '0') end
if tag ~= ARGV[3] then return {'E'} end

local a = 12
local ok = true
local pkeys = {}
-- Heads fetched for the guards (false = absent), reused by the writes below.
local metas = {}
for i = 1, np do
  local key, ver, kind = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  pkeys[i] = key
  if ok then
    local m = metas[key]
    if m == nil then
      m = redis.call('HGET', KEYS[2], key)
      metas[key] = m
    end
    local cur, deleted = '0', '0'
    if m then cur, deleted = string.match(m, '^(%d+)|(%d)|') end
    if kind == 'e' and ver == '0' then
      -- "must not exist": absent or a tombstone.
      if m and deleted == '0' then ok = false end
    elseif cur ~= ver then
      ok = false
    end
  end
end

local ranges = {}
local floor = nil
for i = 1, nr do
  local s, e = ARGV[a + 1], ARGV[a + 2]
  local r = {prefix = ARGV[a], seq = tonumber(ARGV[a + 3])}
  if s ~= '-' then r.start_after = string.sub(s, 2) end
  if e ~= '-' then r.end_at = string.sub(e, 2) end
  a = a + 4
  ranges[i] = r
  if floor == nil or r.seq < floor then floor = r.seq end
end

local function contains(r, key)
  if string.sub(key, 1, #r.prefix) ~= r.prefix then return false end
  if r.start_after and not bytes_lt(r.start_after, key) then return false end
  if r.end_at and bytes_lt(r.end_at, key) then return false end
  return true
end

-- The space seq is only needed here when there are range reads (HINCRBY returns it below).
local changed = nil
if floor ~= nil and floor < tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') then
  changed = redis.call('ZRANGEBYSCORE', KEYS[5], '(' .. floor, '+inf', 'WITHSCORES')
  if ok then
    for j = 1, #changed, 2 do
      local key, kseq = changed[j], tonumber(changed[j + 1])
      for _, r in ipairs(ranges) do
        if kseq > r.seq and contains(r, key) then
          ok = false
          break
        end
      end
      if not ok then break end
    end
  end
end

if not ok then
  -- The epoch ends with a 409 too. With an Idempotency-Key the final 409 body is written by
  -- Python (from core) in finalize.lua, which also ends the epoch: until then a concurrent
  -- retry with the same key sees this pending marker, and if the marker expires first (the
  -- process died in between) a retry is validated against the same read set again, so it
  -- is refused again rather than applied against an emptied one.
  if idem then
    redis.call('SET', idem, '0|' .. ARGV[5] .. '|' .. ARGV[2], 'PX', ARGV[11])
  elseif tag ~= '' then
    redis.call('DEL', KEYS[7])
  end
  local heads = {}
  if #pkeys > 0 then heads = hmget(KEYS[2], pkeys) end
  local ckeys, cmetas = {}, {}
  if changed then
    for j = 1, #changed, 2 do ckeys[#ckeys + 1] = changed[j] end
    if #ckeys > 0 then cmetas = hmget(KEYS[2], ckeys) end
  end
  return {'C', pkeys, heads, ckeys, cmetas, created}
end

local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local by = ARGV[7]
local versions, parts, vparts = {}, {}, {}
for i = 1, nw do
  local key, jkey, del, val = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  a = a + 4
  local m = metas[key]
  if m == nil then m = redis.call('HGET', KEYS[2], key) end
  local v, was_live = 1, false
  if m then
    local pv, pd = string.match(m, '^(%d+)|(%d)|')
    v, was_live = tonumber(pv) + 1, pd == '0'
  end
  local meta = v .. '|' .. del .. '|' .. seq .. '|' .. now .. '|' .. by
  redis.call('HSET', KEYS[2], key, meta)
  if del == '1' then
    redis.call('HDEL', KEYS[3], key)
    redis.call('ZREM', KEYS[4], key)
    val = ''
  else
    redis.call('HSET', KEYS[3], key, val)
    -- The live set holds exactly the keys whose head is not a tombstone.
    if not was_live then redis.call('ZADD', KEYS[4], 0, key) end
  end
  redis.call('ZADD', KEYS[5], seq, key)
  -- History entry: "<byte length of meta>|<meta><value>", so the value may contain anything.
  redis.call('RPUSH', KEYS[7 + i], #meta .. '|' .. meta .. val)
  versions[i] = v
  local deleted_json = 'false'
  if del == '1' then deleted_json = 'true' end
  parts[i] = '{"key":' .. jkey .. ',"version":' .. v .. ',"deleted":' .. deleted_json .. '}'
  vparts[i] = jkey .. ':' .. v
end
-- The log list holds commit seq s at index s-1.
redis.call('RPUSH', KEYS[6], ARGV[6] .. ',"seq":' .. seq .. ',"writes":[' .. table.concat(parts, ',') .. ']}')
if tag ~= '' then redis.call('DEL', KEYS[7]) end
if idem then
  local body = '{"commit_id":"' .. ARGV[2] .. '","seq":' .. seq .. ',"versions":{' .. table.concat(vparts, ',') .. '}}'
  redis.call('SET', idem, '200|' .. ARGV[5] .. '|' .. body, 'PX', ARGV[4])
end
return {'OK', seq, versions, created}

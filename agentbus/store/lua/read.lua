-- Read one shard head and record (key -> version) in the session epoch, atomically.
-- KEYS: 1 meta hash, 2 value hash, 3 epoch hash
-- ARGV: 1 key, 2 now, 3 readset_max_entries, 4 retention ms, 5 token for a new epoch
-- Returns {meta or nil, value or nil, what record() did, epoch tok, gen, started_at}; a
-- tombstone returns its meta and no value.
local meta = redis.call('HGET', KEYS[1], ARGV[1])
local version = '0'
local value = false
if meta then
  local deleted
  version, deleted = string.match(meta, '^(%d+)|(%d)|')
  if deleted == '0' then value = redis.call('HGET', KEYS[2], ARGV[1]) end
end
local did = record(KEYS[3], 'p:' .. ARGV[1], version, ARGV[2], ARGV[3], ARGV[4], ARGV[5])
local hdr = redis.call('HMGET', KEYS[3], 'tok', 'gen', 'started_at')
return {meta, value, did, hdr[1], hdr[2], hdr[3]}

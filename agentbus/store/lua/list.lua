-- List live keys in a lexicographic window and record the range read, atomically: the seq
-- recorded is the space seq at the moment of the listing (SQLStore reads it first, in the
-- same transaction), so a commit the listing missed always has a larger seq.
-- KEYS: 1 space hash, 2 live zset, 3 meta hash, 4 epoch hash
-- ARGV: 1 ZRANGEBYLEX min, 2 max, 3 limit, 4 range ident without its end_at part
--       (RangeRead.ident with end_at=None), 5 now, 6 readset_max_entries, 7 retention ms,
--       8 token for a new epoch
-- Returns {has_more (0/1), keys, metas}.
local seq = redis.call('HGET', KEYS[1], 'seq') or '0'
local limit = tonumber(ARGV[3])
local keys = redis.call('ZRANGEBYLEX', KEYS[2], ARGV[1], ARGV[2], 'LIMIT', 0, limit + 1)
local has_more = 0
if #keys > limit then
  has_more = 1
  keys[#keys] = nil
end
local metas = {}
if #keys > 0 then metas = hmget(KEYS[3], keys) end
local end_at = ''
if has_more == 1 then end_at = keys[#keys] end
record(KEYS[4], 'r:' .. ARGV[4] .. end_at, seq, ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return {has_more, keys, metas}

-- A page of one shard's history, oldest first (Python reverses it). The list holds version v
-- at index v-1: versions start at 1 and grow by exactly one per committed write.
-- KEYS: 1 history list
-- ARGV: 1 before_version (0 = none), 2 limit
local hi = redis.call('LLEN', KEYS[1])
local before = tonumber(ARGV[1])
if before > 0 and before - 1 < hi then hi = before - 1 end
if hi <= 0 then return {} end
local lo = hi - tonumber(ARGV[2]) + 1
if lo < 1 then lo = 1 end
return redis.call('LRANGE', KEYS[1], lo - 1, hi - 1)

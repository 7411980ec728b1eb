-- Append one audit event, to the global and the tenant's log (sorted sets scored by time;
-- the member starts with a zero-padded id, so equal times list newest id first in reverse).
-- KEYS: 1 id counter, 2 global zset, 3 tenant zset, 4 set of tenants with an audit log
-- ARGV: 1 at, 2 event JSON, 3 tenant
local id = redis.call('INCR', KEYS[1])
local member = string.format('%020d', id) .. '|' .. ARGV[2]
redis.call('ZADD', KEYS[2], ARGV[1], member)
redis.call('ZADD', KEYS[3], ARGV[1], member)
redis.call('SADD', KEYS[4], ARGV[3])
return id

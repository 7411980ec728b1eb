-- Store a new token record; its hash and its id must both be new (as the SQL unique keys).
-- KEYS: 1 record hash (by token hash), 2 id -> token hash, 3 zset of ids by created_at
-- ARGV: 1 id, 2 token hash, 3 created_at, then field/value pairs of the record
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1

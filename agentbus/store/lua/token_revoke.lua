-- Revoke a token once (a second revocation keeps the first time) and return its record.
-- KEYS: 1 the token's record hash; ARGV: 1 revoked_at
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1])
return redis.call('HGETALL', KEYS[1])

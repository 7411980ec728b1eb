-- Replace a commit's pending idempotency marker by its final (409) outcome, only if the
-- marker is still this commit's own: if it expired and a retry stored another outcome, that
-- one stands.
-- KEYS: 1 idempotency record
-- ARGV: 1 pending marker, 2 final record, 3 ttl ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0

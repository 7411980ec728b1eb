-- Append timeline events to one space's stream in one call (the Python side would
-- otherwise pack and parse one XADD per event), trim it by count (approximately: whole
-- stream nodes) and by age, and renew its TTL.
-- KEYS: 1 the stream
-- ARGV: 1 max entries, 2 min id (age bound), 3 ttl seconds, 4.. one JSON event each
for i = 4, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
end
redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return #ARGV - 3

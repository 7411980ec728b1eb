-- A commit refused with 410 (read set expired or overflowed) still creates the space (as
-- SQLStore does) and ends the epoch, unless the epoch was already replaced by a new one.
-- KEYS: 1 space hash, 2 epoch hash
-- ARGV: 1 now, 2 token of the epoch that was found expired
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[1])
if redis.call('HGET', KEYS[2], 'tok') == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1

-- Replace a commit's pending idempotency marker by its final (409) outcome and end the
-- session's epoch, only if the marker is still this commit's own: if it expired and a retry
-- stored another outcome, that one stands (and that retry ended the epoch). The epoch is
-- deleted only if it is still the one the commit was validated against (same tok:gen); a
-- read that landed in between is kept, which can only cause a spurious conflict later.
-- KEYS: 1 idempotency record, 2 epoch hash
-- ARGV: 1 pending marker, 2 final record, 3 ttl ms, 4 epoch tag "tok:gen" ("" = none)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  local hdr = redis.call('HMGET', KEYS[2], 'tok', 'gen')
  if hdr[1] and (hdr[1] .. ':' .. (hdr[2] or '0')) == ARGV[4] then
    redis.call('DEL', KEYS[2])
  end
  return 1
end
return 0

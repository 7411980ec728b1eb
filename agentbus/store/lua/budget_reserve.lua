-- Reserve one call's worst case on every scope, or on none (see RedisBudgetStore.reserve).
-- KEYS: 1..n counter hashes (sorted by scope), n+1 reservations hash, n+2 expiry zset
-- ARGV: 1 now, 2 tokens, 3 cost, 4 reservation id, 5 expires_at, 6 reservation record
--       (JSON), then per scope 8 values: scope, max_tokens, max_cost, max_requests,
--       window_s, rpm, tpm, max_concurrent ('' = unlimited)
-- Returns {'OK'} or {'D', scope, reason, retry_after_s, limit, used}.
local now = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local n = #KEYS - 2
local counters = {}
for i = 1, n do
  local a = 6 + (i - 1) * 8
  local L = {
    max_tokens = opt(ARGV[a + 2]), max_cost = opt(ARGV[a + 3]), max_requests = opt(ARGV[a + 4]),
    window_s = tonumber(ARGV[a + 5]), rpm = opt(ARGV[a + 6]), tpm = opt(ARGV[a + 7]),
    max_concurrent = opt(ARGV[a + 8]),
  }
  local c = load_counter(KEYS[i])
  roll(c, L.window_s, now)
  local d = admit(c, L, tokens, cost, now)
  if d then
    -- Nothing is written: the first denial in scope order decides.
    return {'D', ARGV[a + 1], d[1], fmt(d[2]), fmt(d[3]), fmt(d[4])}
  end
  c.window_s = L.window_s
  counters[i] = c
end
for i = 1, n do
  charge(counters[i], tokens, cost)
  store_counter(KEYS[i], counters[i])
end
redis.call('HSET', KEYS[n + 1], ARGV[4], ARGV[6])
redis.call('ZADD', KEYS[n + 2], ARGV[5], ARGV[4])
return {'OK'}

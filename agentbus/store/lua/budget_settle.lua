-- Swap a reservation for actual usage (zero = release), once (see RedisBudgetStore.settle).
-- KEYS: 1 reservations hash, 2 expiry zset, 3.. counter hashes of the reservation's scopes
-- ARGV: 1 reservation id, 2 now, 3 actual tokens, 4 actual cost, 5 counter key prefix,
--       6 "1" to release (the call failed)
-- Returns 1 if applied, 0 if the reservation was already settled or swept.
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
local r = cjson.decode(rec)
-- The stored scopes and amount are the truth; the keys the caller derived must match them.
if #r.scopes ~= #KEYS - 2 then return redis.error_reply('ERR budget reservation scopes do not match keys') end
for i, scope in ipairs(r.scopes) do
  if KEYS[i + 2] ~= ARGV[5] .. scope then
    return redis.error_reply('ERR budget reservation scopes do not match keys')
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local now = tonumber(ARGV[2])
local a_tokens = tonumber(ARGV[3])
local a_cost = tonumber(ARGV[4])
local release = ARGV[6] == '1'
for i = 3, #KEYS do
  local c, exists = load_counter(KEYS[i])
  if exists then  -- a scope whose counter is gone has nothing to give back
    roll(c, c.window_s, now)
    settle(c, r.tokens, r.cost, a_tokens, a_cost, r.created_at, release)
    store_counter(KEYS[i], c)
  end
end
return 1

-- Count one finished call on every scope in one step: budget.charge (reserve then settle
-- of the actual usage), for scopes without limits, which can never deny.
-- KEYS: 1..n counter hashes (sorted by scope)
-- ARGV: 1 now, 2 tokens, 3 cost, 4 release "1"|"0", then per scope its window_s
local now = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local release = ARGV[4] == '1'
for i = 1, #KEYS do
  local c = load_counter(KEYS[i])
  c.window_s = tonumber(ARGV[4 + i])
  roll(c, c.window_s, now)
  charge(c, tokens, cost)
  settle(c, tokens, cost, tokens, cost, now, release)
  store_counter(KEYS[i], c)
end
return 1

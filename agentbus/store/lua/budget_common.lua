-- Budget arithmetic for the agentbus budget scripts; Python prepends this file to each
-- budget_*.lua body. It mirrors agentbus/broker/budget.py line by line (roll, admit,
-- reserve, settle): Lua numbers are IEEE doubles like Python floats, so the same inputs give
-- the same results. Numbers are stored with %.17g, which round-trips a double exactly
-- (tostring() keeps only 14 digits).
--
-- A counter is a hash with the fields of budget.Counter plus window_s, the budget period
-- the scope was last reserved under (settle has no limits to roll with).

local MINUTE = 60.0
local FIELDS = {'window_start', 'tokens', 'cost', 'requests', 'minute_start',
                'minute_requests', 'minute_tokens', 'inflight', 'window_s'}

local function fmt(x) return string.format('%.17g', x) end

-- '' (unlimited) -> nil
local function opt(s)
  if s == nil or s == '' then return nil end
  return tonumber(s)
end

local function window_start(now, window_s)
  if window_s <= 0 then return 0.0 end
  return math.floor(now / window_s) * window_s
end

-- The counter stored at key (zeros if missing), and whether it exists.
local function load_counter(key)
  local v = redis.call('HMGET', key, unpack(FIELDS))
  local c = {}
  for i, f in ipairs(FIELDS) do c[f] = tonumber(v[i]) or 0 end
  return c, v[1] ~= false
end

local function store_counter(key, c)
  local args = {}
  for _, f in ipairs(FIELDS) do
    args[#args + 1] = f
    args[#args + 1] = fmt(c[f])
  end
  redis.call('HSET', key, unpack(args))
end

-- budget.roll: new windows where the old ones ended; in-flight calls carry over.
local function roll(c, window_s, now)
  local ws = window_start(now, window_s)
  if ws ~= c.window_start then
    c.window_start = ws
    c.tokens = 0
    c.cost = 0.0
    c.requests = 0
  end
  local ms = window_start(now, MINUTE)
  if ms ~= c.minute_start then
    c.minute_start = ms
    c.minute_requests = 0
    c.minute_tokens = 0
  end
end

-- budget.admit: nil, or {reason, retry_after_s, limit, used}. L holds the limits (nil =
-- unlimited) and window_s.
local function admit(c, L, tokens, cost, now)
  -- A lifetime budget never resets: no retry can succeed.
  local budget_retry = math.huge
  if L.window_s > 0 then budget_retry = math.max(1.0, c.window_start + L.window_s - now) end
  local minute_retry = math.max(1.0, c.minute_start + MINUTE - now)
  local checks = {
    {'requests', L.max_requests, c.requests, 1, budget_retry},
    {'tokens', L.max_tokens, c.tokens, tokens, budget_retry},
    {'cost', L.max_cost, c.cost, cost, budget_retry},
    {'rpm', L.rpm, c.minute_requests, 1, minute_retry},
    {'tpm', L.tpm, c.minute_tokens, tokens, minute_retry},
    {'concurrency', L.max_concurrent, c.inflight, 1, 1.0},
  }
  for i = 1, #checks do
    local ch = checks[i]
    local limit = ch[2]
    if limit ~= nil and ch[3] + ch[4] > limit + 1e-9 then
      return {ch[1], ch[5], limit, ch[3]}
    end
  end
  return nil
end

-- budget.reserve
local function charge(c, tokens, cost)
  c.tokens = c.tokens + tokens
  c.cost = c.cost + cost
  c.requests = c.requests + 1
  c.minute_requests = c.minute_requests + 1
  c.minute_tokens = c.minute_tokens + tokens
  c.inflight = c.inflight + 1
end

-- budget.settle (actual zero = release)
-- budget.settle: a reservation charged to an earlier window gives nothing back to this
-- one; release (a failed call) also returns its request to the budget window.
local function settle(c, r_tokens, r_cost, a_tokens, a_cost, reserved_at, release)
  local same_w = window_start(reserved_at, c.window_s) == c.window_start
  local same_m = window_start(reserved_at, MINUTE) == c.minute_start
  local back_t, back_c, mback = 0, 0.0, 0
  if same_w then back_t = r_tokens; back_c = r_cost end
  if same_m then mback = r_tokens end
  c.tokens = math.max(0, c.tokens - back_t + a_tokens)
  c.cost = math.max(0.0, c.cost - back_c + a_cost)
  if release and same_w then c.requests = math.max(0, c.requests - 1) end
  c.minute_tokens = math.max(0, c.minute_tokens - mback + a_tokens)
  c.inflight = math.max(0, c.inflight - 1)
end

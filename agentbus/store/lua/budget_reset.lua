-- Zero a scope's counter, keeping its window_s for settles still in flight (as SQL does).
-- KEYS: 1 counter hash
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local c = load_counter(KEYS[1])
for _, f in ipairs(FIELDS) do
  if f ~= 'window_s' then c[f] = 0 end
end
store_counter(KEYS[1], c)
return 1

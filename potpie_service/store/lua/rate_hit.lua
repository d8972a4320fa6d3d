-- Count one request against each limit's window; returns per limit its count and the ms left in its window
-- (fixed windows, opened by a client's first request).
-- KEYS: one counter per limit.   a: windows_ms (one per key)
local out = {}
for i, key in ipairs(KEYS) do
  local count = redis.call('INCR', key)
  local left = redis.call('PTTL', key)
  if count == 1 or left < 0 then
    redis.call('PEXPIRE', key, a.windows_ms[i])
    left = a.windows_ms[i]
  end
  out[#out + 1] = count
  out[#out + 1] = left
end
return out
